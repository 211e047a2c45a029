"""The names each setting may take (architectures, data sets, precisions, export formats, stages, ...).

Kept in one place: config.py checks values against them, and the registries
(models.ARCHITECTURES, export.FORMATS, precision.PRECISIONS, the data loaders,
confusion.MATRIX_KINDS, the pipeline's stages) are keyed by them.

No torch here: config.py and the command line's --help import this module.
"""
from __future__ import annotations

STAGES = ("generalist", "clusters", "specialists", "ensemble", "student", "export")  # in the order they run
DEVICES = ("cpu", "cuda", "auto")  # auto: CUDA when a GPU is visible, else the CPU
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where it is native and pays, else fp32
STORAGES = ("auto", "memory", "stream")  # where an image folder's decoded images live while training
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")  # torchvision.transforms.v2's per-image policies
MIXES = ("none", "mixup", "cutmix", "mixup_cutmix")  # batch mixing of torchvision.transforms.v2
DATA_SETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
ARCHITECTURES = ("mlp", "cnn", "resnet", "torchvision", "timm")  # the last two: a library's model by name
NAMED_ARCHITECTURES = ("torchvision", "timm")  # of ARCHITECTURES: built by a library from model.name
NORMALIZATIONS = ("auto", "data", "weights")  # whose mean and std a model normalises its inputs with
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
MATRIX_KINDS = ("hard", "soft", "covariance")  # the confusability matrices k-means may see
SPECIALIST_INITS = ("generalist", "scratch")
DUSTBIN_CORRECTIONS = ("validation", "prior", "none")
BACKENDS = ("loky", "dask")
TRANSFERS = ("live", "views", "view_mean", "dataset")  # how the student sees its teacher's targets
LOSSES = ("kd", "dkd")  # the student's distillation loss: Hinton's, or decoupled KD (Zhao et al. 2022)
EXPORT_FORMATS = ("torchscript", "export", "onnx", "state_dict")
