"""ensemble-kd: a generalist, specialists for the classes it confuses, one distilled student.

The pipeline is `ensemble-kd run` (see `cli.py`); from Python, `load_student(path)` opens
an exported student in any format (`export.py`) for prediction.
"""
from .export import LoadedStudent, load_student

__version__ = "0.1.0"
__all__ = ["LoadedStudent", "load_student", "__version__"]
