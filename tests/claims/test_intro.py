"""The introduction's and the primer's claims against the cached results and the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gilib.book import summary

CHAPTERS = Path(__file__).resolve().parents[2] / "chapters"
INTRO = (CHAPTERS / "intro.md").read_text()


@pytest.fixture(scope="module")
def table():
    return summary.leakage_table()


def _prose(text: str) -> str:
    """The page without its code cells and with line breaks folded."""
    return " ".join(re.sub(r"```.*?```", "", text, flags=re.S).split())


def test_the_summary_paragraph_quotes_the_summary_table(table):
    prose = _prose(INTRO)
    query, span = table.iloc[2], table.iloc[3]
    assert f"{query['share (%)']:.2f} % of the model" in prose
    assert f"mean {{term}}`ROUGE-1` of {query['rouge1']:.2f}" in prose
    assert f"(95 % interval {query['low']:.2f} to {query['high']:.2f}" in prose
    # "every one of its 12 sentences exactly": all of them, and that many.
    assert span["exact"] == 1.0
    assert f"every one of its {span['sentences']} sentences exactly" in prose
    # "What a DP-SGD client sends, even at the smallest noise of chapter 4's grid, leaves the
    # optimisation attack next to nothing."
    from gilib.book.summary import DP_SIGMA
    from gilib.data import repo_root
    from gilib.studies.store import read_lines

    sigmas = {l["cell"]["dp"]["noise_multiplier"] for l in read_lines(repo_root() / "data/results/ch4_dp.jsonl")}
    assert DP_SIGMA == min(s for s in sigmas if s > 0)
    dp = table[table["shared"].str.startswith("DP-SGD's message")]
    assert len(dp) == 2 and (dp["rouge1"].round(2) == 0).all() and (dp["exact"] == 0).all()


def test_the_figures_have_names_captions_and_alt_text():
    for page in ("intro.md", "primer.md"):
        text = (CHAPTERS / page).read_text()
        cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", text, flags=re.S)
        drawing = [c for c in cells if re.search(r"plots\.(?!set_style)\w+\(", c)]
        assert drawing, page
        for cell in drawing:
            assert re.search(r"name: fig-\w+", cell) and "caption:" in cell and "alt:" in cell, (page, cell)


def test_the_same_weight_is_a_smaller_share_of_bert_base():
    # "0.65 % of the model (of MiniLM ...; the same weight is 0.54 % of the larger BERT-base)".
    from gilib.data import repo_root
    from gilib.studies.store import read_lines

    (bert,) = [l for l in read_lines(repo_root() / "data/results/shapes.jsonl")
               if l["study"] == "shares" and l["shape"] == "bert-base-shape"
               and l["component"] == "attention.query" and l["layers"] == 0]
    assert f"{100 * bert['fraction']:.2f} % of the larger BERT-base" in _prose(INTRO)


def test_the_primers_label_and_token_count_reads_say_what_its_cell_prints():
    # "The bias gradient is negative only at label 1, and 8 rows of the position-embedding gradient are
    # non-zero: six words plus [CLS] and [SEP]." Only the shared gradients feed the two reads.
    from gilib import client_update, encode, load_model, select

    prose = _prose((CHAPTERS / "primer.md").read_text())
    assert "negative only at label 1, and 8 rows" in prose
    model, tokenizer = load_model("minilm")
    full = select(model, "full")
    update = client_update(model, full, encode(tokenizer, "the cat sat on the mat", 1)).shared
    shared_grads = dict(zip(full.names, update.shared_grads))
    bias = shared_grads["classifier.bias"]
    assert (bias < 0).tolist() == [False, True]
    rows = shared_grads["bert.embeddings.position_embeddings.weight"]
    assert int((rows.norm(dim=1) > 0).sum()) == 8
