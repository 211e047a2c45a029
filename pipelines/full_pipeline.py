"""The full ensemble-kd pipeline as a script; same arguments as `ensemble-kd run`.

    python pipelines/full_pipeline.py --config pipelines/configs/fashion-mnist.toml --out artifacts/fmnist

Stages (see ensemble_kd/pipeline.py, which runs them in this order, each reading the last one's files):
  1. generalist          ensemble_kd/generalist.py   one classifier over all classes
  2. confusability       ensemble_kd/confusion.py    how often class i is taken for class j
  3. clusters            ensemble_kd/confusion.py    k-means groups of confusable classes
  4. specialists         ensemble_kd/specialists.py  one per cluster, in parallel
  5. ensemble            ensemble_kd/ensemble.py     generalist + specialists (Hinton eq. 5)
  6. student             ensemble_kd/distill.py      the ensemble distilled into one small net
  7. export              ensemble_kd/export.py       TorchScript / ONNX / state dict, checked
"""
import sys

try:
    from ensemble_kd.cli import main
except ModuleNotFoundError as err:  # run by a Python without the package, e.g. the system's python
    print(f"error: {err.name} is not installed for {sys.executable}; run this script with .venv/bin/python "
          "(make demo or make test creates .venv), or `source .venv/bin/activate` first", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
