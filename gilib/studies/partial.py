"""Chapter 7's bench readers: LoRA's rank rule, and the span check and the optimisation attack on a GPT-2-style decoder.

Chapter 7 ("Partial by design") quotes four cached benches, not a runner
study: ``bench/lora_rank.py`` (``data/bench/lora_rank.csv``: the span check
on a LoRA client's adapter gradients, one line per sentence and setting),
``bench/decoder_span.py`` (``data/bench/decoder_span.csv``: the causal
span check on a decoder client's layer 0, one line per batch) and
``bench/decoder_optimization.py`` (``data/bench/decoder_optimization.csv``:
LAMP's optimisation attack, Balunović et al., 2022, on the same messages,
one line per sentence) and ``bench/lora_decoder.py``
(``data/bench/lora_decoder.csv``: the span check on a LoRA decoder
client's layer-0 adapter gradients, one line per sentence and setting).
Each reader
turns a CSV into ``(table, facts)``: a table with rounded numbers and
Wilson 95 % intervals (:func:`gilib.metrics.share_interval`: an exact rate
is a binomial share), and the facts the chapter, the conclusion and the
claims tests quote. :data:`STUDY` prints the tables in Markdown, as the
README quotes them::

    python -m gilib.studies partial rank-rule data/bench/lora_rank.csv
    python -m gilib.studies partial decoder data/bench/decoder_span.csv
    python -m gilib.studies partial decoder-optimization data/bench/decoder_optimization.csv
    python -m gilib.studies partial lora-decoder data/bench/lora_decoder.csv

It reads only; it has nothing to run (``plan`` is ``None``, as for
:mod:`gilib.studies.headlines`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..metrics import interval_text, mean_interval, share_interval
from .federated import intervals
from .study import Study, Table, frame_markdown, option

RANK_RULE_BENCH = "data/bench/lora_rank.csv"
"""``python bench/lora_rank.py --per-dataset 4 --out data/bench/lora_rank.csv``."""
DECODER_BENCH = "data/bench/decoder_span.csv"
"""``python bench/decoder_span.py --batches 10 --out data/bench/decoder_span.csv``."""
DECODER_OPTIMIZATION_BENCH = "data/bench/decoder_optimization.csv"
"""``python bench/decoder_optimization.py --out data/bench/decoder_optimization.csv``."""
LORA_DECODER_BENCH = "data/bench/lora_decoder.csv"
"""``python bench/lora_decoder.py --per-dataset 5 --out data/bench/lora_decoder.csv``."""
ADAPTER_NAMES = {"query": "query", "value": "value", "both": "query + value"}
DECODER_ADAPTER_NAMES = {"c_attn": "c_attn", "c_attn+mlp": "c_attn + mlp.c_fc"}


def _frame(path: str | Path | pd.DataFrame) -> pd.DataFrame:
    return path if isinstance(path, pd.DataFrame) else pd.read_csv(path)


def _percent(hits: float, n: int) -> tuple[str, float, float, float]:
    share, low, high = share_interval(hits, n)
    return interval_text(share, low, high, 0, percent=True), share, low, high


def rank_rule_summary(path: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The span check on LoRA adapter gradients, by rank, adapters and whether the sentence fits.

    A sentence *fits* a setting when its ``n`` distinct layer-0 inputs are
    at most the stacked ``A`` rows' capacity, ``r`` times the adapters
    (the rank rule's condition for an exact check).

    Args:
        path: ``bench/lora_rank.py``'s CSV (one line per sentence and
            setting: ``r``, ``adapters``, ``tokens``, ``capacity``,
            ``fits``, ``exact``, ``residual``, ``b_exact``,
            ``b_passing_median``, ...), or its lines.

    Returns:
        ``(table, facts)``. The table has one row per ``(r, adapters,
        fits)``: the stacked capacity, the sentences and their median token
        count, the exact rate [Wilson 95 %] and the share of sentences
        ``B``'s gradient alone pins. The facts: ``lora_lines``,
        ``lora_sentences``, ``lora_settings``, ``lora_tokens_min`` /
        ``_max``; ``lora_fit_lines``, ``lora_fit_exact``, ``lora_fit_low``,
        ``lora_fit_residual_max``; the same ``lora_nofit_*`` (with
        ``_high`` and ``_residual_min``); ``lora_rule_holds`` (every
        fitting line exact, no other); ``lora_b_small_lines`` /
        ``_exact`` (``n < r``: ``B`` alone), ``lora_b_large_lines`` /
        ``_exact`` and ``lora_b_large_passing`` (``n >= r``: the median
        count of tokens that pass per position); ``lora_seconds_max``.
    """
    frame = _frame(path)
    fits = frame["fits"].astype(bool)
    exact = frame["exact"].astype(bool)
    rows = []
    for (r, adapters, fit), part in frame.groupby(["r", "adapters", "fits"], sort=True):
        text, *_ = _percent(int(part["exact"].sum()), len(part))
        rows.append({"r": int(r), "adapters": ADAPTER_NAMES.get(adapters, adapters),
                     "stacked rank ≤": int(part["capacity"].iloc[0]),
                     "fits (n ≤ rank)": "yes" if fit else "no", "sentences": len(part),
                     "tokens n (median)": int(part["tokens"].median()),
                     "exact [95 %]": text,
                     "B alone exact": f"{100 * part['b_exact'].mean():.0f}%"})
    order = list(ADAPTER_NAMES.values())
    table = pd.DataFrame(rows).sort_values(
        ["r", "adapters", "fits (n ≤ rank)"], key=lambda c: c.map(order.index) if c.name == "adapters" else c,
        kind="stable", ignore_index=True)
    facts: dict = {"lora_lines": len(frame),
                   "lora_sentences": int(frame[["dataset", "row_id"]].drop_duplicates().shape[0]),
                   "lora_settings": int(frame[["r", "adapters"]].drop_duplicates().shape[0]),
                   "lora_tokens_min": int(frame["tokens"].min()), "lora_tokens_max": int(frame["tokens"].max()),
                   "lora_rule_holds": bool((exact == fits).all()),
                   "lora_seconds_max": round(float(frame["seconds"].max()), 1)}
    for key, mask in (("fit", fits), ("nofit", ~fits)):
        part = frame[mask]
        _, share, low, high = _percent(int(part["exact"].sum()), len(part))
        facts.update({f"lora_{key}_lines": len(part), f"lora_{key}_exact": round(share, 4),
                      f"lora_{key}_low": round(low, 4), f"lora_{key}_high": round(high, 4)})
    facts["lora_fit_residual_max"] = float(f"{frame.loc[fits, 'residual'].max():.1e}")
    facts["lora_nofit_residual_min"] = round(float(frame.loc[~fits, "residual"].min()), 2)
    small = frame["tokens"] < frame["r"]
    facts.update({"lora_b_small_lines": int(small.sum()),
                  "lora_b_small_exact": round(float(frame.loc[small, "b_exact"].mean()), 4),
                  "lora_b_large_lines": int((~small).sum()),
                  "lora_b_large_exact": round(float(frame.loc[~small, "b_exact"].mean()), 4),
                  "lora_b_large_passing": int(frame.loc[~small, "b_passing_median"].median())})
    return table, facts


def rank_rule_markdown(path: str | Path | pd.DataFrame) -> str:
    """:func:`rank_rule_summary`'s table as Markdown (the README repeats it)."""
    table, _ = rank_rule_summary(path)
    return frame_markdown(table)


def decoder_summary(path: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The causal span check on a decoder client's layer 0, per batch size.

    Args:
        path: ``bench/decoder_span.py``'s CSV (one line per batch:
            ``batch_size``, ``tokens``, ``exact``, ``sentences_exact``,
            ``seconds``, ``timed_out``, ...), or its lines.

    Returns:
        ``(table, facts)``. The table has one row per batch size: the
        batches, their mean token count, the batches rebuilt exactly
        [Wilson 95 %], the sentences rebuilt exactly, the mean and largest
        seconds per batch and the batches out of time. The facts:
        ``decoder_exact_<B>``, ``decoder_low_<B>``, ``decoder_seconds_<B>``
        (mean) and ``decoder_batches_<B>`` per batch size ``B``;
        ``decoder_sizes``, ``decoder_batches``, ``decoder_all_exact``,
        ``decoder_timed_out``, ``decoder_seconds_max``,
        ``decoder_tokens_max`` (the largest batch's tokens).
    """
    frame = _frame(path)
    rows, facts = [], {}
    for size, part in frame.groupby("batch_size", sort=True):
        text, share, low, _ = _percent(int(part["exact"].sum()), len(part))
        rows.append({"batch size": int(size), "batches": len(part),
                     "tokens (mean)": round(float(part["tokens"].mean()), 1),
                     "batches exact [95 %]": text,
                     "sentences exact": f"{100 * part['sentences_exact'].mean():.0f}%",
                     "s / batch (mean)": round(float(part["seconds"].mean()), 1),
                     "s / batch (max)": round(float(part["seconds"].max()), 1),
                     "out of time": int(part["timed_out"].sum())})
        facts.update({f"decoder_exact_{size}": round(share, 4), f"decoder_low_{size}": round(low, 4),
                      f"decoder_seconds_{size}": round(float(part["seconds"].mean()), 1),
                      f"decoder_batches_{size}": len(part)})
    facts.update({"decoder_sizes": [int(s) for s in sorted(frame["batch_size"].unique())],
                  "decoder_batches": len(frame),
                  "decoder_all_exact": bool(frame["exact"].astype(bool).all()),
                  "decoder_timed_out": int(frame["timed_out"].sum()),
                  "decoder_seconds_max": round(float(frame["seconds"].max()), 1),
                  "decoder_tokens_max": int(frame["tokens"].max())})
    return pd.DataFrame(rows), facts


def decoder_markdown(path: str | Path | pd.DataFrame) -> str:
    """:func:`decoder_summary`'s table as Markdown (the README repeats it)."""
    table, _ = decoder_summary(path)
    return frame_markdown(table)


def decoder_optimization_summary(path: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The optimisation attack on a decoder client's layer 0, per batch size.

    A batch's sentences share one message, so the batch is the unit: the
    exact share is a Wilson interval over batches (each counts its share of
    sentences, :func:`gilib.metrics.share_interval`), and ROUGE's interval
    resamples batches (:func:`gilib.studies.federated.intervals`).

    Args:
        path: ``bench/decoder_optimization.py``'s CSV (one line per
            sentence: ``dataset``, ``batch_size``, ``row_ids`` (its
            batch's), ``tokens``, ``exact``, ``rouge1``, ``rouge2``,
            ``seconds`` (its batch's), ``steps``, ...), or its lines.

    Returns:
        ``(table, facts)``. The table has one row per batch size: the
        batches and sentences, the sentences rebuilt exactly [Wilson 95 %],
        mean ROUGE-1 and ROUGE-2 [bootstrap 95 %] and the mean seconds per
        batch. The facts, per batch size ``B``:
        ``decoder_opt_batches_<B>``, ``decoder_opt_sentences_<B>``,
        ``decoder_opt_exact_<B>`` (with ``_low_`` and ``_high_``),
        ``decoder_opt_rouge1_<B>`` and ``decoder_opt_rouge2_<B>`` (each
        with ``_low_`` and ``_high_``), ``decoder_opt_seconds_<B>``; and
        ``decoder_opt_sizes``, ``decoder_opt_sentences``,
        ``decoder_opt_exact_sentences`` (a count), ``decoder_opt_steps``.

    Raises:
        ValueError: for lines of several step counts (one table, one setting).
    """
    frame = _frame(path)
    steps = sorted(frame["steps"].unique())
    if len(steps) != 1:
        raise ValueError(f"The lines hold attacks of several step counts {steps}: summarise one setting at a time.")
    frame = frame.assign(message=frame["dataset"] + " " + frame["row_ids"].astype(str))
    rouge = {name: intervals(frame, ["batch_size"], name).set_index("batch_size") for name in ("rouge1", "rouge2")}
    rows, facts = [], {}
    for size, part in frame.groupby("batch_size", sort=True):
        batches = part.groupby("message")
        text, share, low, high = _percent(float(batches["exact"].mean().sum()), batches.ngroups)
        rows.append({"batch size": int(size), "batches": batches.ngroups, "sentences": len(part),
                     "sentences exact [95 %]": text,
                     "ROUGE-1 [95 %]": rouge["rouge1"].loc[size, "text"],
                     "ROUGE-2 [95 %]": rouge["rouge2"].loc[size, "text"],
                     "s / batch (mean)": round(float(batches["seconds"].first().mean()), 1)})
        facts.update({f"decoder_opt_batches_{size}": batches.ngroups, f"decoder_opt_sentences_{size}": len(part),
                      f"decoder_opt_exact_{size}": round(share, 4), f"decoder_opt_exact_low_{size}": round(low, 4),
                      f"decoder_opt_exact_high_{size}": round(high, 4),
                      f"decoder_opt_seconds_{size}": round(float(batches["seconds"].first().mean()), 1)})
        for name, cells in rouge.items():
            facts.update({f"decoder_opt_{name}_{size}": round(float(cells.loc[size, name]), 2),
                          f"decoder_opt_{name}_low_{size}": round(float(cells.loc[size, "low"]), 2),
                          f"decoder_opt_{name}_high_{size}": round(float(cells.loc[size, "high"]), 2)})
    facts.update({"decoder_opt_sizes": [int(s) for s in sorted(frame["batch_size"].unique())],
                  "decoder_opt_sentences": len(frame),
                  "decoder_opt_exact_sentences": int(frame["exact"].astype(bool).sum()),
                  "decoder_opt_steps": int(steps[0])})
    return pd.DataFrame(rows), facts


def decoder_optimization_markdown(path: str | Path | pd.DataFrame) -> str:
    """:func:`decoder_optimization_summary`'s table as Markdown (the README repeats it)."""
    table, _ = decoder_optimization_summary(path)
    return frame_markdown(table)


def lora_decoder_summary(path: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The span check on a LoRA decoder's layer-0 adapter gradients, by rank, adapters and whether the sentence fits.

    A sentence *fits* when its distinct inputs (its tokens less the end
    token, whose output gradient is zero) are at most ``r``, the rows of
    the ``c_attn`` adapter's ``A`` gradient: the rank rule's condition for
    a certified check. Below it the check reads each position's best token
    within a subspace of the inputs' span, which may be right or not.

    Args:
        path: ``bench/lora_decoder.py``'s CSV (one line per sentence and
            setting: ``r``, ``adapters``, ``tokens``, ``inputs``, ``fits``,
            ``verified``, ``found``, ``exact``, ``token_accuracy``,
            ``rouge1``, ``residual``, ``seconds``, ...), or its lines.

    Returns:
        ``(table, facts)``. The table has one row per ``(r, adapters,
        fits)``: the sentences and their median token count, the exact rate
        [Wilson 95 %], the share whose prefixes the ``mlp.c_fc`` adapter
        checked, the mean ROUGE-1 [bootstrap 95 % over sentences] and the
        mean seconds. The facts: ``lora_dec_lines``, ``lora_dec_sentences``,
        ``lora_dec_settings``, ``lora_dec_tokens_min`` / ``_max``;
        ``lora_dec_fit_lines``, ``lora_dec_fit_exact`` (with ``_low``),
        ``lora_dec_fit_residual_max``; ``lora_dec_nofit_lines``,
        ``lora_dec_nofit_exact_lines`` (a count: exact, uncertified),
        ``lora_dec_nofit_residual_min``; ``lora_dec_fit_all_exact`` (every
        fitting line exact); ``lora_dec_verified_lines`` and
        ``lora_dec_verified_found`` (every checked line found whole);
        ``lora_dec_rouge1_<r>`` (mean over ``c_attn``'s lines at rank
        ``r``); ``lora_dec_seconds_max``.
    """
    frame = _frame(path)
    fits = frame["fits"].astype(bool)
    exact = frame["exact"].astype(bool)
    rows = []
    order = list(DECODER_ADAPTER_NAMES)
    keys = sorted(frame.groupby(["r", "adapters", "fits"]).groups,
                  key=lambda k: (k[0], order.index(k[1]) if k[1] in order else len(order), not k[2]))
    for r, adapters, fit in keys:
        part = frame[(frame["r"] == r) & (frame["adapters"] == adapters) & (fits == fit)]
        text, *_ = _percent(int(part["exact"].sum()), len(part))
        rouge = interval_text(*mean_interval(part["rouge1"].astype(float)), 2)
        rows.append({"r": int(r), "adapters": DECODER_ADAPTER_NAMES.get(adapters, adapters),
                     "fits (n - 1 ≤ r)": "yes" if fit else "no", "sentences": len(part),
                     "tokens n (median)": int(part["tokens"].median()), "exact [95 %]": text,
                     "prefixes checked": f"{100 * part['verified'].astype(bool).mean():.0f}%",
                     "ROUGE-1 [95 %]": rouge, "s (mean)": round(float(part["seconds"].mean()), 1)})
    verified = frame["verified"].astype(bool)
    _, share, low, _ = _percent(int(exact[fits].sum()), int(fits.sum()))
    facts: dict = {"lora_dec_lines": len(frame),
                   "lora_dec_sentences": int(frame[["dataset", "row_id"]].drop_duplicates().shape[0]),
                   "lora_dec_settings": int(frame[["r", "adapters"]].drop_duplicates().shape[0]),
                   "lora_dec_tokens_min": int(frame["tokens"].min()), "lora_dec_tokens_max": int(frame["tokens"].max()),
                   "lora_dec_fit_lines": int(fits.sum()), "lora_dec_fit_exact": round(share, 4),
                   "lora_dec_fit_low": round(low, 4), "lora_dec_fit_all_exact": bool(exact[fits].all()),
                   "lora_dec_fit_residual_max": float(f"{frame.loc[fits, 'residual'].max():.1e}"),
                   "lora_dec_nofit_lines": int((~fits).sum()),
                   "lora_dec_nofit_exact_lines": int(exact[~fits].sum()),
                   "lora_dec_nofit_residual_min": round(float(frame.loc[~fits, "residual"].min()), 2),
                   "lora_dec_verified_lines": int(verified.sum()),
                   "lora_dec_verified_found": bool(frame.loc[verified, "found"].astype(bool).all()),
                   "lora_dec_seconds_max": round(float(frame["seconds"].max()), 1)}
    for r, part in frame[frame["adapters"] == "c_attn"].groupby("r"):
        facts[f"lora_dec_rouge1_{int(r)}"] = round(float(part["rouge1"].mean()), 2)
    return pd.DataFrame(rows), facts


def lora_decoder_markdown(path: str | Path | pd.DataFrame) -> str:
    """:func:`lora_decoder_summary`'s table as Markdown."""
    table, _ = lora_decoder_summary(path)
    return frame_markdown(table)


STUDY = Study(
    name="partial",
    description="chapter 7: LoRA's rank rule, the decoder's span check and optimisation attack, LoRA on the "
                "decoder, read from the cached benches",
    tables=(
        Table("rank-rule", "LoRA adapters: the span check's exact rate [Wilson 95 %] by rank, adapters and "
                           "whether the sentence fits the stacked rank (bench/lora_rank.py)",
              lambda args: rank_rule_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/lora_rank.csv)"),)),
        Table("decoder", "a GPT-2-shape decoder sharing layer 0: batches rebuilt exactly [Wilson 95 %] and "
                         "seconds per batch size (bench/decoder_span.py)",
              lambda args: decoder_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/decoder_span.csv)"),)),
        Table("decoder-optimization", "a GPT-2-shape decoder sharing layer 0: LAMP's optimisation attack, "
                                      "sentences exact [Wilson 95 %] and ROUGE-1/2 [bootstrap 95 % over "
                                      "batches] per batch size (bench/decoder_optimization.py)",
              lambda args: decoder_optimization_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/decoder_optimization.csv)"),)),
        Table("lora-decoder", "a GPT-2-shape LoRA decoder sharing its layer-0 adapters' A gradients: exact "
                              "[Wilson 95 %] and ROUGE-1 [bootstrap 95 %] by rank, adapters and whether the "
                              "sentence fits the rank (bench/lora_decoder.py)",
              lambda args: lora_decoder_markdown(args.results),
              (option("results", type=Path, help="the bench's CSV (data/bench/lora_decoder.csv)"),)),
    ),
)
"""Chapter 7's tables (``python -m gilib.studies partial ...``); nothing to run."""
