"""Q/K projection row order: llama.cpp interleaves the two rotary halves of
every head; Hugging Face keeps them apart."""

from __future__ import annotations

import torch


def permute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> GGUF row order of a Q or K projection (llama.cpp convert_hf_to_gguf `permute`).

    HF's rotary embedding pairs dim i with i + head_dim/2 ("rotate_half");
    llama.cpp's pairs 2i with 2i+1, so its converter interleaves the two halves
    of every head. Only needed to test `unpermute_qk_rows`.
    """
    _check_qk_rows(w, n_head)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF -> HF row order of a Q or K projection (transformers' `_reverse_permute_weights`).

    `n_head` is the number of heads the rows belong to: num_attention_heads for
    Q, num_key_value_heads for K. Works on float rows and on raw quantized rows
    alike (a row is never split).
    """
    _check_qk_rows(w, n_head)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_qk_rows(w: torch.Tensor, n_head: int) -> None:
    if n_head < 1 or w.dim() < 1 or w.shape[0] % (2 * n_head):
        raise ValueError(f"{tuple(w.shape)} rows cannot be split into {n_head} heads of even size")
