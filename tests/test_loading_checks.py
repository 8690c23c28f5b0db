"""Loading refuses bad checkpoints with a ValueError naming what is wrong: index
shards outside the model folder, NaN/Inf weights, corrupt safetensors files;
and a GGUF that fails conversion leaves no cache behind."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from paged_attention.entrypoints.cli import main as cli_main
from paged_attention.model import gguf as pg
from paged_attention.model.gguf.reader import read_gguf_header
from paged_attention.model.loader import load_model
from tests.engine_utils import save_random_model
from tests.test_gguf import write_tiny_gguf


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder, _ = save_random_model(tmp_path, "llama")
    return folder


def test_an_index_may_not_point_outside_the_model_folder(model_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}})
    )
    with pytest.raises(ValueError, match=r"'../elsewhere.safetensors' .* outside the model folder"):
        load_model(model_dir)


def test_a_nan_weight_is_named_with_its_file(model_dir: Path) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = math.nan
    tensors[name][0, 0] = math.inf
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=rf"weight '{name}' in .*model.safetensors holds 2 NaN/Inf"):
        load_model(model_dir)


def test_a_corrupt_safetensors_file_is_a_value_error_naming_it(model_dir: Path, capsys) -> None:
    file = model_dir / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 10**9) + b"{not json")
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model.safetensors"):
        load_model(model_dir)
    # The command line says so in one line and exits 2, without a traceback.
    assert cli_main(["generate", "hi", "--model", str(model_dir), "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read safetensors file") and "Traceback" not in err


def test_a_gguf_that_fails_conversion_is_never_cached(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    path = write_tiny_gguf(tmp_path / "bad" / "tiny.gguf")
    info = read_gguf_header(path).tensors["output_norm.weight"]
    with open(path, "r+b") as f:  # an F32 tensor: its first value becomes NaN
        f.seek(info.offset)
        f.write(struct.pack("<f", math.nan))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"weight 'output_norm.weight' in .*tiny.gguf holds 1 NaN/Inf"):
        dict(pg.load_gguf(path, cache_dir=cache)[1])
    assert not list(cache.glob("**/*.safetensors")) and not list(cache.glob("**/*.tmp"))
    with pytest.raises(ValueError, match="NaN/Inf"):  # the quantized path checks too
        dict(pg.load_gguf_quantized(path)[1])


def test_a_nan_weight_is_named_when_a_rank_reads_its_slices(model_dir: Path) -> None:
    """Tensor-parallel ranks read their slices straight from the files: the same
    check applies to what each one reads."""
    from paged_attention.distributed.parallel_state import ParallelContext

    file = model_dir / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][0, 0] = math.nan  # row 0: rank 0's slice
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=rf"weight '{name}' in .*model.safetensors holds 1 NaN/Inf"):
        load_model(model_dir, tp=ParallelContext(0, 2))
