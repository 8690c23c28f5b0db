"""Read a Llama GGUF file into Hugging Face names, shapes and float32 tensors.

Why not `gguf.GGUFReader` + `gguf.quants.dequantize` (what transformers uses)?
Speed. For the default model (SmolLM2-135M Q4_1, 98 MB) transformers takes
~16 s; here the header is parsed with `struct`, skipping the string arrays
(`reader`), and the blocks are dequantized by in-place numpy kernels that are
bit-identical to gguf-py (`dequant`), ~0.2-0.6 s in all. `load_gguf` keeps the
result as a float32 safetensors file (`cache`), so later starts only
memory-map it.

Modules: `reader` (header), `ggml_types` (block layouts), `dequant` (kernels),
`names` and `qk_rows` (GGUF -> HF tensor names and Q/K row order),
`hf_config` (metadata -> HF config), `cache` (safetensors cache), `load`
(`load_gguf`; `load_gguf_quantized` keeps Q4_0/Q4_1/Q4_K blocks as int4
records for `model/quant`, without the cache), `default_model` (the default
GGUF's path).
"""

from paged_attention.model.gguf.cache import CACHE_FORMAT, cache_file_for
from paged_attention.model.gguf.default_model import (
    DEFAULT_GGUF_INSTALL,
    DEFAULT_GGUF_PACKAGE,
    DEFAULT_GGUF_VERSION,
    DefaultModelNotInstalledError,
    default_gguf_path,
)
from paged_attention.model.gguf.dequant import dequantize
from paged_attention.model.gguf.hf_config import SUPPORTED_GGUF_ARCHITECTURES, gguf_config
from paged_attention.model.gguf.load import load_gguf, load_gguf_quantized
from paged_attention.model.gguf.names import hf_tensor_name
from paged_attention.model.gguf.qk_rows import permute_qk_rows, unpermute_qk_rows
from paged_attention.model.gguf.reader import (
    GGUFHeader,
    SkippedStrings,
    TensorInfo,
    read_gguf_header,
)

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_GGUF_INSTALL",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_VERSION",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "DefaultModelNotInstalledError",
    "GGUFHeader",
    "SkippedStrings",
    "TensorInfo",
    "cache_file_for",
    "default_gguf_path",
    "dequantize",
    "gguf_config",
    "hf_tensor_name",
    "load_gguf",
    "load_gguf_quantized",
    "permute_qk_rows",
    "read_gguf_header",
    "unpermute_qk_rows",
]
