"""Which models a server serves: ``--model`` flags and a model repository on disk (no gRPC).

A model repository is a directory with one subdirectory per model::

    models/
      resnet50/
        model.yaml          architecture: resnet50
        1/weights.npz
      tiny/
        model.toml          architecture = "chain", factory = "tinynet:build", ...
        2/weights.npz
        labels.txt

``NAME/model.yaml`` (or ``model.toml``) describes the model; numbered subdirectories
hold its versions, and the highest number is served unless ``version`` says otherwise.
The served weights are ``weights`` from the file (``auto``, ``random:SEED`` or a path,
relative to the model's directory), else ``NAME/VERSION/weights.npz`` (or
``weights.caffemodel``), else the built-in default (cached pretrained weights, else
``random:0``). Keys of a model file:

* ``architecture``: a built-in (``vgg16``, ``vgg19``, ``googlenet``, ``resnet50``,
  ``resnet101``, ``resnet152``) or ``chain`` for a user's own ``chainer.Chain``;
* ``default``: true for the model a request without ``model`` gets (else the first);
* ``version``, ``weights``: as above;
* for ``chain`` only: ``factory`` (import path ``package.module:callable`` returning the
  Chain), ``factory_kwargs``, ``python_path`` (a directory, relative to the model's,
  put on ``sys.path`` first), ``input`` (``shape``, ``channel_order``, ``mean``,
  ``min_size``), ``preprocess`` (``caffe`` or an import path), ``layers`` and
  ``layers_from`` (``forward`` or ``links``), ``logits``, ``probability``, ``labels``
  (a text file, one class name per line).

Import paths come only from these files, never from a request.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence

from layergrad_server.models.base import InputSpec, ModelAdapter
from layergrad_server.models.chain import ChainAdapter, ChainConfig
from layergrad_server.models.vision import BUILTINS, DEFAULT_MODEL

#: Built-in architectures by their lower-case served name.
BUILTIN_NAMES: Mapping[str, str] = {name.lower(): name for name in BUILTINS}
CHAIN = "chain"
MODEL_FILES = ("model.yaml", "model.yml", "model.toml")
WEIGHT_FILES = ("weights.npz", "weights.caffemodel")
_KNOWN_KEYS = {
    "architecture",
    "default",
    "version",
    "weights",
    "factory",
    "factory_kwargs",
    "python_path",
    "input",
    "preprocess",
    "layers",
    "layers_from",
    "logits",
    "probability",
    "labels",
}


class ModelConfigError(ValueError):
    """A ``--model`` flag or a model repository entry that cannot be served."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model to serve: its name, architecture, version, weights choice and (for a Chain) code."""

    name: str
    architecture: str
    weights: str | None = None
    version: str = "1"
    default: bool = False
    chain: ChainConfig | None = None
    python_path: str | None = None

    @property
    def display_architecture(self) -> str:
        """What the network is, as its adapter names it: "ResNet50", a Chain's model name."""
        return self.chain.name if self.chain is not None else BUILTIN_NAMES[self.architecture]

    def adapter(self) -> ModelAdapter:
        """The model's adapter (imports a Chain's code)."""
        if self.chain is None:
            return BUILTINS[BUILTIN_NAMES[self.architecture]]()
        if self.python_path and self.python_path not in sys.path:
            sys.path.insert(0, self.python_path)
        return ChainAdapter(self.chain)


def default_models(weights: str | None) -> list[ModelConfig]:
    """What a server with no model configuration serves: VGG16 with ``--weights``."""
    return [ModelConfig(DEFAULT_MODEL.lower(), DEFAULT_MODEL.lower(), weights, default=True)]


def parse_model_flag(value: str) -> ModelConfig:
    """``--model NAME[=WEIGHTS]``: a built-in model under its own name, with a weights choice."""
    name, sep, weights = value.partition("=")
    name = name.strip().lower()
    if name not in BUILTIN_NAMES:
        raise ModelConfigError(
            f"--model {value!r}: {name!r} is not a built-in model ({', '.join(BUILTIN_NAMES)}); serve "
            "your own Chainer models from a --model-repository"
        )
    if sep and not weights:
        raise ModelConfigError(f"--model {value!r}: give weights after '=' or leave '=' out")
    return ModelConfig(name, name, weights or None)


def read_repository(root: str | os.PathLike[str]) -> list[ModelConfig]:
    """Every model of a repository, in name order; ModelConfigError naming the file at fault."""
    base = pathlib.Path(root)
    if not base.is_dir():
        raise ModelConfigError(f"model repository {str(base)!r} is not a directory")
    found = []
    for directory in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [directory / name for name in MODEL_FILES if (directory / name).is_file()]
        if not files:
            continue
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            raise ModelConfigError(f"{directory}: more than one model file ({names})")
        found.append(read_model_file(files[0]))
    if not found:
        raise ModelConfigError(f"model repository {str(base)!r} holds no NAME/model.yaml or NAME/model.toml")
    return found


def read_model_file(path: pathlib.Path) -> ModelConfig:
    """One ``NAME/model.yaml|toml``; the model is named after its directory."""
    try:
        if path.suffix == ".toml":
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        else:
            import yaml

            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
    except (OSError, ValueError) as error:  # yaml.YAMLError and TOMLDecodeError are ValueErrors
        raise ModelConfigError(f"{path}: cannot read: {error}") from error
    except Exception as error:  # yaml's own error classes
        raise ModelConfigError(f"{path}: cannot read: {error}") from error
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return _model_config(path.parent, data)
    except ModelConfigError as error:
        raise ModelConfigError(f"{path}: {error}") from None
    except (TypeError, ValueError) as error:
        raise ModelConfigError(f"{path}: {error}") from error


def _model_config(directory: pathlib.Path, data: dict) -> ModelConfig:
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise ModelConfigError(f"unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")
    name = directory.name
    architecture = str(data.get("architecture", "")).lower()
    if architecture != CHAIN and architecture not in BUILTIN_NAMES:
        raise ModelConfigError(
            f"architecture {data.get('architecture')!r} is neither a built-in ({', '.join(BUILTIN_NAMES)}) "
            f"nor {CHAIN!r}"
        )
    version = str(data["version"]) if "version" in data else _latest_version(directory)
    weights = data.get("weights")
    if weights is not None:
        weights = str(weights)
        if not weights.startswith("random:") and weights != "auto":
            weights = str((directory / weights).resolve())
    else:
        for candidate in WEIGHT_FILES:
            path = directory / version / candidate
            if path.is_file():
                weights = str(path.resolve())
                break
    default = bool(data.get("default", False))
    if architecture != CHAIN:
        chain_keys = sorted(set(data) & {"factory", "factory_kwargs", "python_path", "input", "layers"})
        if chain_keys:
            raise ModelConfigError(f"keys {chain_keys} are for architecture 'chain' only")
        return ModelConfig(name, architecture, weights, version, default)
    if weights is None:
        raise ModelConfigError(f"a chain model needs weights: {version}/weights.npz or a 'weights' key")
    for key in ("factory", "input", "layers"):
        if key not in data:
            raise ModelConfigError(f"a chain model needs {key!r}")
    spec = data["input"]
    if not isinstance(spec, dict) or "shape" not in spec:
        raise ModelConfigError("'input' needs at least a 'shape' ([channels, height, width])")
    input_spec = InputSpec(
        shape=tuple(int(n) for n in spec["shape"]),
        layout=str(spec.get("layout", "CHW")),
        channel_order=str(spec.get("channel_order", "BGR")),
        mean=tuple(float(v) for v in spec.get("mean", ())),
        min_size=None if spec.get("min_size") is None else _pair(spec["min_size"]),
    )
    labels = data.get("labels")
    chain = ChainConfig(
        name=name,
        factory=str(data["factory"]),
        input_spec=input_spec,
        layers=tuple(str(layer) for layer in _sequence(data["layers"], "layers")),
        layers_from=str(data.get("layers_from", "forward")),
        preprocess=str(data.get("preprocess", "caffe")),
        logits_layer=data.get("logits"),
        probability_layer=data.get("probability"),
        labels_file=None if labels is None else str((directory / str(labels)).resolve()),
        version=version,
        factory_kwargs=dict(data.get("factory_kwargs", {})),
    )
    python_path = data.get("python_path")
    return ModelConfig(
        name,
        CHAIN,
        weights,
        version,
        default,
        chain,
        None if python_path is None else str((directory / str(python_path)).resolve()),
    )


def _latest_version(directory: pathlib.Path) -> str:
    numbers = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return str(max(numbers)) if numbers else "1"


def _pair(value: object) -> tuple[int, int]:
    items = _sequence(value, "min_size")
    if len(items) != 2:
        raise ModelConfigError(f"min_size must be [height, width], got {value!r}")
    return int(items[0]), int(items[1])


def _sequence(value: object, key: str) -> Sequence[object]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ModelConfigError(f"{key!r} must be a list")
    return list(value)


def check_unique(models: Sequence[ModelConfig]) -> list[ModelConfig]:
    """``models`` with one default; ModelConfigError for a name given twice or two defaults."""
    names = [m.name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ModelConfigError(f"models configured twice: {', '.join(twice)}")
    defaults = [m.name for m in models if m.default]
    if len(defaults) > 1:
        raise ModelConfigError(f"more than one default model: {', '.join(defaults)}")
    if not defaults and models:
        models = [dataclasses.replace(models[0], default=True), *models[1:]]
    return list(models)
