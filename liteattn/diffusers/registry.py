"""Which diffusers models liteattn patches, and which of their attention layers: one registration per family.

A model family is one file in ``liteattn/diffusers/models/`` (imported automatically) whose processor class carries
a :func:`register` decorator. The registration declares the transformer class it serves, the original processor
classes it replaces, which attention modules are video self-attention, and how text tokens take part (joint-text
strategies). Everything else (the supported-model list, the errors, ``enable``'s checks) is derived from it.
"""

from __future__ import annotations

import importlib
import numbers
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..parallel import check_context_parallel

__all__ = ["ModelFamily", "register", "families", "supported_transformers", "find_transformers", "layers_to_patch"]

# Pipeline attributes that may hold a denoiser (Wan 2.2 has two: high-noise and low-noise experts).
PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class ModelFamily:
    """What liteattn knows about one diffusers transformer class.

    Attributes:
        transformer: the diffusers class name, e.g. ``"WanTransformer3DModel"``.
        processor: the liteattn processor class (``processor(original_processor, joint_text)``).
        originals: the original processor classes it replaces, as ``"module:Class"`` paths.
        is_video_self_attention: ``(module_name, module) -> bool``, which attention modules to patch.
        joint_text: the joint-text strategies it supports (:mod:`liteattn.joint`); empty when its self-attention
            holds video tokens only. The first is the default.
        layout: one line on where the text tokens sit, for the docs.
    """

    transformer: str
    processor: type
    originals: Tuple[str, ...]
    is_video_self_attention: Callable[[str, Any], bool]
    joint_text: Tuple[str, ...] = ()
    layout: str = ""

    def original_classes(self) -> Tuple[type, ...]:
        classes = []
        for path in self.originals:
            module, name = path.split(":")
            classes.append(getattr(importlib.import_module(module), name))
        return tuple(classes)

    def transformer_class(self, diffusers) -> type:
        return getattr(diffusers, self.transformer)

    def check_joint_text(self, joint_text: Optional[str]) -> Optional[str]:
        """The strategy this family runs for the user's choice (``None``: its default)."""
        if not self.joint_text:
            return None
        if joint_text is None:
            return self.joint_text[0]
        if joint_text not in self.joint_text:
            raise ValueError(f"joint_text={joint_text!r}: {self.transformer} supports {list(self.joint_text)}")
        return joint_text


_FAMILIES: Dict[str, ModelFamily] = {}


def register(transformer: str, *, originals: Tuple[str, ...], is_video_self_attention: Callable[[str, Any], bool],
             joint_text: Tuple[str, ...] = (), layout: str = ""):
    """Class decorator: register the decorated processor as liteattn's for ``transformer``."""

    def decorate(processor: type) -> type:
        if transformer in _FAMILIES:
            raise ValueError(f"{transformer} is already registered by {_FAMILIES[transformer].processor.__name__}")
        _FAMILIES[transformer] = ModelFamily(transformer, processor, tuple(originals), is_video_self_attention,
                                             tuple(joint_text), layout)
        return processor

    return decorate


def families() -> Dict[str, ModelFamily]:
    """Every registered family, by transformer class name (imports the family files on first use)."""
    from . import models

    for info in pkgutil.iter_modules(models.__path__):
        importlib.import_module(f"{models.__name__}.{info.name}")
    return dict(_FAMILIES)


def supported_transformers() -> Tuple[str, ...]:
    return tuple(families())


def _family_of(module, diffusers) -> Optional[ModelFamily]:
    for family in families().values():
        if isinstance(module, family.transformer_class(diffusers)):
            return family
    return None


def find_transformers(obj, diffusers) -> List[Tuple[str, Any, ModelFamily]]:
    """``(attribute name, transformer module, family)`` for a pipeline's denoisers or a transformer itself."""
    supported = ", ".join(supported_transformers())
    if isinstance(obj, torch.nn.Module):
        module = getattr(obj, "_orig_mod", obj)  # a torch.compile'd module
        family = _family_of(module, diffusers)
        if family is None:
            raise ValueError(f"liteattn.enable supports {supported}; got {type(module).__name__}")
        return [("transformer", module, family)]
    found, others = [], []
    for name in PIPELINE_TRANSFORMERS:
        module = getattr(obj, name, None)
        if module is None:
            continue
        module = getattr(module, "_orig_mod", module)
        family = _family_of(module, diffusers)
        if family is not None:
            found.append((name, module, family))
        else:
            others.append(f"{name}: {type(module).__name__}")
    if not found:
        got = "; ".join(others) if others else f"{type(obj).__name__} without a `transformer`"
        raise ValueError(f"liteattn.enable supports pipelines or transformers of {supported}; got {got}")
    if others:
        raise ValueError(f"liteattn.enable supports {supported}; got {'; '.join(others)}")
    return found


def layers_to_patch(family: ModelFamily, transformer_name: str, module, layers) -> List[Tuple[str, Any]]:
    """``(name, attention module)`` of the video self-attention layers to patch, in block order.

    ``layers``: None (all), or indices in block order (negative from the end) and/or module names.
    """
    import logging

    originals = family.original_classes()
    candidates = []
    for name, submodule in module.named_modules():
        processor = getattr(submodule, "processor", None)
        if processor is None or not hasattr(submodule, "set_processor"):
            continue
        if not family.is_video_self_attention(name, submodule):
            continue
        if not isinstance(processor, originals):
            logging.getLogger("liteattn").warning(
                "liteattn: leaving %s.%s alone: its processor is %s, not one of %s", transformer_name, name,
                type(processor).__name__, [c.__name__ for c in originals])
            continue
        check_context_parallel(getattr(processor, "_parallel_config", None), family.transformer,
                               family.processor.context_parallel, family.processor.context_parallel_note)
        candidates.append((name, submodule))
    if not candidates:
        raise ValueError(f"{transformer_name} ({type(module).__name__}) has no video self-attention with its "
                         f"original diffusers processor to patch")
    return _select(candidates, layers, transformer_name)


def _select(candidates: List[Tuple[str, Any]], layers, transformer_name: str) -> List[Tuple[str, Any]]:
    if layers is None:
        return candidates
    if isinstance(layers, (str, int)):
        layers = [layers]
    chosen = []
    names = [name for name, _ in candidates]
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (numbers.Integral, str)):
            raise TypeError(f"layers must hold layer indices or module names, got {item!r}")
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"layers: {transformer_name} has no video self-attention named {item!r}; "
                                 f"it has {names[:3]}...{names[-1:]}")
            index = names.index(item)
        else:
            index = int(item)
            if not -len(names) <= index < len(names):
                raise ValueError(f"layers: index {index} is out of range; {transformer_name} has {len(names)} "
                                 f"video self-attention layers")
            index %= len(names)
        if candidates[index] not in chosen:
            chosen.append(candidates[index])
    return sorted(chosen, key=lambda c: names.index(c[0]))
