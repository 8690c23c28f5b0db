"""Batched next-token sampling: greedy, temperature, top-k, top-p, min-p, and
grammar masks for structured output.

One `Sampler.sample` call handles a whole decode step. Everything that touches
the vocabulary dimension is a tensor op over the batch; the only Python loops
are over rows (to draw each seeded row's noise from its own generator, and to
turn results into lists).

Reproducibility contract: a row's sampled token depends only on that row's
logits, its params and its generator's state, never on which other rows are
in the batch or where the row sits. That is why
  * filtering masks are computed on a sorted copy but applied to the logits in
    their original order (so a row's softmax sums the same values in the same
    order whether or not some other row made us build a mask), and
  * each seeded row draws exactly V exponentials from its own generator per
    step.

Grammar masks (`TokenMask`, one packed bitmask for the step's guided rows)
remove tokens before everything else, greedy included, and before log-probs are
taken, as in vLLM: a guided row's log-probs are the log-softmax of its raw
logits over the tokens its grammar allows (the rest are left out of
`top_logprobs`). Temperature and the filters never change log-probs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from paged_attention import native
from paged_attention.guided.bitmask import TokenMask, unpack_bitmask
from paged_attention.sampling_params import SamplingParams

# torch generators take seeds in [0, 2**64); Python seeds (as vLLM accepts)
# may be any int, so reduce them into that range.
_SEED_MODULUS = 2**64


def make_generator(
    seed: int | None, fallback_seed: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator for one request: seeded by `seed`, else by `fallback_seed`.

    The engine passes a per-request `fallback_seed` (e.g. derived from its own
    seed and the request index) so unseeded requests are still reproducible
    run to run while differing from each other.
    """
    chosen = fallback_seed if seed is None else seed
    if isinstance(chosen, bool) or not isinstance(chosen, int):
        raise ValueError(f"seed must be an int, got {chosen!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(chosen % _SEED_MODULUS)
    return gen


@dataclass
class SamplerOutput:
    """One sampled token per row, with its log-probability.

    `logprobs[i]` and the values in `top_logprobs[i]` are log_softmax of the
    row's RAW logits (before temperature and filtering; after a grammar mask),
    as vLLM reports them.
    `top_logprobs[i]` is None unless that row asked for logprobs; otherwise it
    holds the top-N tokens in descending order followed by the sampled token if
    it was not among them (so N or N + 1 entries).
    """

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]


def greedy_and_normalizer(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of each row's maximum, each row's log(sum(exp(logits))))
    of float32 logits [B, V]: one C pass on the CPU (`csrc/logits.c`, 1.8 ms
    for 64 x 49,152 on one core against 6.4 for max + log_softmax), PyTorch
    elsewhere and for rows holding NaN or +inf."""
    lib = native.library_for(logits.dtype, logits.device)
    if lib is not None and logits.dtype == torch.float32 and logits.is_contiguous():
        rows, vocab = logits.shape
        ids = torch.empty(rows, dtype=torch.int64)
        lse = torch.empty(rows, dtype=torch.float32)
        lib.greedy_lse(
            logits.data_ptr(), rows, vocab, ids.data_ptr(), lse.data_ptr(), torch.get_num_threads()
        )
        if bool(torch.isfinite(lse).all()):
            return ids, lse
    return logits.max(dim=-1).indices, torch.logsumexp(logits, dim=-1)


class Sampler:
    """Stateless; one instance can serve any number of batches."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        mask: TokenMask | None = None,
    ) -> SamplerOutput:
        """One token per row; `mask` (optional) limits some rows to the tokens
        their grammar allows."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"need one SamplingParams and one generator per row: batch={batch}, "
                f"got {len(params)} params and {len(generators)} generators"
            )
        if batch == 0:
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])
        if vocab == 0:
            raise ValueError("logits must have vocab size >= 1, got 0")

        logits = logits.float()
        if mask is not None and mask.rows:
            logits = self._apply_mask(logits, mask)
        # Greedy rows take the first maximum of the raw logits; the random rows
        # overwrite their entries below. Log-probabilities are logit - lse.
        token_ids, lse = greedy_and_normalizer(logits)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            sampled = self._sample_random(
                logits[random_rows],
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
            )
            token_ids[torch.tensor(random_rows, device=logits.device)] = sampled

        ids = token_ids.tolist()
        chosen = (logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - lse).tolist()
        return SamplerOutput(
            token_ids=ids,
            logprobs=chosen,
            top_logprobs=self._top_logprobs(logits, lse, ids, chosen, params),
        )

    __call__ = sample

    def _apply_mask(self, logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
        """A copy of `logits` with the disallowed tokens of the masked rows at -inf."""
        batch, vocab = logits.shape
        bad = [r for r in mask.rows if not 0 <= r < batch]
        if bad:
            raise ValueError(f"mask row {bad[0]} is outside the batch (0..{batch - 1})")
        allowed = unpack_bitmask(mask.bitmask, vocab).to(logits.device)
        if not bool(allowed.any(dim=-1).all()):
            raise ValueError("a grammar mask allows no token: its grammar has already ended")
        rows = torch.tensor(mask.rows, device=logits.device)
        masked = logits.clone()
        masked[rows] = logits[rows].masked_fill(~allowed, -math.inf)
        return masked

    # -- random rows ---------------------------------------------------------

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample one token per row of `logits` [R, V] (all non-greedy rows)."""
        rows, vocab = logits.shape
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        scaled = logits / temperature.unsqueeze(1)

        mask = self._filter_mask(scaled, params)
        if mask is not None:
            scaled = scaled.masked_fill(mask, -math.inf)
        probs = torch.softmax(scaled, dim=-1)

        noise = self._exponential_noise(rows, vocab, generators, device)
        # Exponential race: argmax_j p_j / E_j with E_j ~ Exp(1) i.i.d. picks j
        # with probability p_j (min of exponentials with rates p_j). Masked
        # tokens have p_j = 0 and can never win.
        return (probs / noise).argmax(dim=-1)

    def _filter_mask(self, scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor | None:
        """True where a token is removed by top-k, top-p or min-p; None if no row filters.

        Each filter's mask is only built when some row uses it, and is ANDed
        with a per-row "uses it" flag so float noise in (say) a cumulative sum
        can never drop tokens from a row that asked for no filtering.
        """
        rows, vocab = scaled.shape
        device = scaled.device
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        use_k = [0 < k < vocab for k in top_k]
        use_p = [p < 1.0 for p in top_p]
        use_min_p = [m > 0.0 for m in min_p]
        if not (any(use_k) or any(use_p) or any(use_min_p)):
            return None

        mask = torch.zeros_like(scaled, dtype=torch.bool)
        if any(use_k) or any(use_p):
            # Stable descending sort: among equal logits the lower token id
            # comes first, matching argmax's tie-break, so top_k=1 == greedy.
            sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
            position = torch.arange(vocab, device=device).unsqueeze(0)
            sorted_mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if any(use_k):
                k = torch.tensor([k if u else vocab for k, u in zip(top_k, use_k)], device=device)
                sorted_mask |= position >= k.unsqueeze(1)
            if any(use_p):
                # Top-p acts on the distribution left after top-k (vLLM order).
                sorted_probs = torch.softmax(sorted_logits.masked_fill(sorted_mask, -math.inf), dim=-1)
                # Mass strictly before each token; the token is dropped once
                # that already reaches top_p. The top token has 0 before it,
                # so it always survives.
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                p = torch.tensor(top_p, dtype=torch.float32, device=device)
                rows_p = torch.tensor(use_p, device=device).unsqueeze(1)
                sorted_mask |= (mass_before >= p.unsqueeze(1)) & rows_p
            mask.scatter_(1, order, sorted_mask)
        if any(use_min_p):
            # prob_j < min_p * max_prob  <=>  logit_j < max_logit + log(min_p);
            # comparing logits avoids a softmax and is exact for the top token.
            # Renormalising after top-k/top-p scales every prob alike, so the
            # ratio test gives the same answer before or after them.
            m = torch.tensor(min_p, dtype=torch.float32, device=device)
            threshold = scaled.max(dim=-1, keepdim=True).values + torch.log(m).unsqueeze(1)
            rows_m = torch.tensor(use_min_p, device=device).unsqueeze(1)
            mask |= (scaled < threshold) & rows_m
        return mask

    def _exponential_noise(
        self,
        rows: int,
        vocab: int,
        generators: Sequence[torch.Generator | None],
        device: torch.device,
    ) -> torch.Tensor:
        noise = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=device)
            noise[idx] = torch.empty(len(unseeded), vocab, device=device).exponential_()
        for i, gen in enumerate(generators):
            if gen is not None:
                # Draw on the generator's own device (a CPU generator cannot
                # fill a GPU tensor), then move.
                row = torch.empty(vocab, dtype=torch.float32, device=gen.device)
                noise[i] = row.exponential_(generator=gen).to(device)
        # Exp(1) can return exactly 0 on some backends; p / 0 would be inf or
        # NaN and win the argmax regardless of p.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    # -- logprobs ----------------------------------------------------------

    def _top_logprobs(
        self,
        logits: torch.Tensor,
        lse: torch.Tensor,
        sampled: list[int],
        sampled_lp: list[float],
        params: Sequence[SamplingParams],
    ) -> list[dict[int, float] | None]:
        wanted = [p.logprobs for p in params]
        requested = [n for n in wanted if n is not None]
        if not requested:
            return [None] * len(params)
        # One topk for the whole batch at the largest N asked for; a row's N
        # above the vocab size is capped (there are only V tokens to report).
        k = min(max(requested), logits.shape[1])
        values, indices = logits.topk(k, dim=-1)
        values = values - lse.unsqueeze(1)
        values_list: list[list[float]] = values.tolist()
        indices_list: list[list[int]] = indices.tolist()

        out: list[dict[int, float] | None] = []
        for row, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            # -inf: a token the row's grammar forbids (and not JSON-serialisable).
            entry = {t: v for t, v in zip(indices_list[row][:n], values_list[row][:n]) if v > -math.inf}
            entry.setdefault(sampled[row], sampled_lp[row])
            out.append(entry)
        return out
