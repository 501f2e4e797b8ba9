"""The built-in models as a dataset with versions, after CompilerGym's datasets.

CompilerGym names every program of a dataset with a versioned URI, so that a result can say
exactly what it was measured on. Here the dataset is the zoo registry (every suite it holds):
each :class:`Benchmark` carries the zoo entry's description and a *version*, the key of its
cached ONNX export. That key hashes everything that changes the exported graph (the builder
source, sizes, seed, opset, the torch and ``transformers`` versions), so two results with the
same version were measured on the same model.

>>> from fusion_rl.graph.datasets import zoo_dataset
>>> ds = zoo_dataset()
>>> "resnet_tiny" in ds, ds["resnet_tiny"].family
(True, 'residual_cnn')
>>> ds["resnet_tiny"].uri.startswith("zoo://tiny/resnet_tiny@")  # doctest: +SKIP
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from fusion_rl.errors import UnknownModelError
from fusion_rl.graph import zoo

if TYPE_CHECKING:
    from fusion_rl.graph.model import Model


@dataclass(frozen=True)
class Benchmark:
    """One model of a dataset.

    Attributes
    ----------
    name
        The zoo name, accepted wherever a model is (``load_model``, CLI ``MODEL``, env specs).
    suite
        The zoo suite it belongs to (``tiny``; ``bench`` for deployment-size models).
    family, source, description
        As in the zoo registry (:class:`fusion_rl.graph.zoo.ZooEntry`).
    version
        The key of its ONNX export, or None when it cannot be built here (an optional extra is
        missing; ``needs`` says which).
    needs
        The extra a ``transformers`` model needs when it is not installed, else None.
    """

    name: str
    suite: str
    family: str
    source: str
    description: str
    version: str | None
    needs: str | None = None

    @property
    def uri(self) -> str:
        """``zoo://<suite>/<name>@<version>``: what a result was measured on."""
        return f"zoo://{self.suite}/{self.name}@{self.version or 'unavailable'}"

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "suite": self.suite, "family": self.family,
                "source": self.source, "description": self.description,
                "version": self.version, "needs": self.needs, "uri": self.uri}


class ModelDataset:
    """The zoo registry as a dataset: iterate, index by name, load.

    Parameters
    ----------
    seed
        The weight seed the versions are computed for (``load_model(name, seed=...)``).
    """

    name = "zoo"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        # Every suite the registry has: a bench suite appears here as soon as it is registered.
        self._entries = {e.name: e for e in zoo.list_models()}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Benchmark]:
        return (self[name] for name in self._entries)

    def __getitem__(self, name: str) -> Benchmark:
        if name not in self._entries:
            raise UnknownModelError(
                f"'{name}' is not in the {self.name} dataset; models: {', '.join(self._entries)}"
            )
        return _benchmark(name, self.seed)

    def __repr__(self) -> str:
        return f"ModelDataset({self.name!r}, {len(self)} models, suites {self.suites})"

    @property
    def names(self) -> list[str]:
        """Model names, in registration order."""
        return list(self._entries)

    @property
    def suites(self) -> list[str]:
        """The suites present, in registration order."""
        return list(dict.fromkeys(getattr(e, "suite", "tiny") for e in self._entries.values()))

    def benchmarks(self, suite: str | None = None) -> list[Benchmark]:
        """Every benchmark, or those of ``suite``."""
        return [b for b in self if suite is None or b.suite == suite]

    def load(self, name: str) -> Model:
        """Import model ``name`` (:func:`fusion_rl.graph.model.load_model`)."""
        from fusion_rl.graph.model import load_model

        self[name]  # unknown names fail here, naming the dataset
        return load_model(name, seed=self.seed)


@functools.lru_cache(maxsize=None)
def _benchmark(name: str, seed: int) -> Benchmark:
    entry = zoo.get_entry(name)
    needs = None
    try:
        # The export cache key: it changes exactly when the exported graph may change.
        version: str | None = zoo.cache_key(entry, zoo.resolve_sizes(entry, {}), seed)
    except ImportError:  # a transformers model without the [hf] extra
        version, needs = None, "hf"
    return Benchmark(name=entry.name, suite=getattr(entry, "suite", "tiny"), family=entry.family,
                     source=entry.source, description=entry.description, version=version,
                     needs=needs)


def zoo_dataset(seed: int = 0) -> ModelDataset:
    """The built-in models (every zoo suite) with their versions."""
    return ModelDataset(seed=seed)
