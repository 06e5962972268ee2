"""Chapter 4 (DP-SGD as a defence), executed once: its records against its prose (see tests/chapters)."""

from __future__ import annotations

import pytest

from tests.claims.cached import SIGMAS, LARGE_PART, NOTHING, SELECTIONS
from tests.chapters import executed_chapter
from gilib.book.pages import page_problems
from gilib.data import repo_root

pytestmark = pytest.mark.slow


ch4 = executed_chapter("04_dp_defence")


def test_chapter4_runs_end_to_end(ch4):
    # The Opacus check (privatised = raw x clip factor at sigma = 0) is an
    # assertion inside the chapter; it passed if the chapter ran. Every
    # selection and noise level of the figure was recorded.
    for selection in SELECTIONS:
        assert sorted(ch4[f"priv_rouge1_{selection}"]) == sorted(SIGMAS)
    assert sorted(ch4["utility_accuracy"]) == sorted(SIGMAS)


def test_chapter4_at_sigma_0_1_the_query_gradient_is_almost_all_noise(ch4):
    # "At sigma = 0.1 the privatised gradient of layer 0's query weight has
    # cosine ... with the raw one: almost all of what the client sends about
    # that weight is noise."
    assert abs(ch4["cosine_query0_sigma0.1"]) < 0.1


def test_chapter4_the_raw_gradient_leaks_as_in_chapters_2_and_3(ch4):
    # "the attack recovers as much as in chapters 2 and 3 (the dashed lines;
    # ROUGE-1 0.66 on the full model)".
    assert ch4["raw_full"] >= 0.5
    assert all(ch4[f"raw_rouge1_{s}"] >= LARGE_PART for s in SELECTIONS)


def test_chapter4_clipping_alone_protects_nothing(ch4):
    # "Clipping alone (sigma = 0) protects nothing: the cosine attack ignores
    # the gradient's scale": the privatised gradient at sigma = 0 leaks as
    # much as the raw one.
    for selection in SELECTIONS:
        assert ch4[f"priv_rouge1_{selection}"]["0.0"] == pytest.approx(ch4[f"raw_rouge1_{selection}"], abs=0.05)


def test_chapter4_the_privatised_gradient_leaks_nothing_from_the_smallest_sigma_on(ch4):
    # "In our runs it does [protect], from the smallest sigma on: ROUGE-1 0.00
    # on the full model at sigma = 0.01": at every sigma >= 0.01, for every selection.
    assert ch4["priv_full_sigma0.01"] <= NOTHING
    for selection in SELECTIONS:
        noisy = {s: v for s, v in ch4[f"priv_rouge1_{selection}"].items() if float(s) >= 0.01}
        assert noisy and max(noisy.values()) <= NOTHING, (selection, noisy)


def test_chapter4_the_noise_outweighs_the_clipped_signal(ch4):
    # "over the full model's 11.0 M coordinates, the noise's norm at
    # sigma = 0.01 is already 33.2 times C": far above the clipped gradient's
    # norm, at most C.
    assert ch4["noise_to_clip_full_sigma0.01"] > 10


def test_chapter4_only_the_top_of_the_range_gives_a_single_digit_epsilon(ch4):
    # "The budget falls steeply with sigma ... only the top of the paper's
    # range gives a guarantee in the single digits; below it, the guarantee is void."
    assert ch4["epsilon_sigma0.1"] > ch4["epsilon_sigma0.2"] > ch4["epsilon_sigma0.5"]
    assert ch4["epsilon_sigma0.5"] < 10
    assert ch4["epsilon_sigma0.2"] > 50 and ch4["epsilon_sigma0.1"] > 50


def test_chapter4_the_deployed_setting_is_one_setting_for_privacy_utility_and_leakage(ch4):
    # "At sigma = 0.01 the accuracy stays inside the no-noise baseline's interval and the attack recovers
    # at most a stray word at every batch size, but epsilon is 1.63e+05 ... At sigma = 0.5 the same 30
    # steps give epsilon = 4.5, and the model falls to chance" (the no-noise recipe is above 0.75).
    assert ch4["deployed_accuracy_sigma0"] > 0.75 and ch4["deployed_epsilon_sigma0"] is None
    assert ch4["deployed_epsilon_sigma0.01"] > 1e4 and ch4["deployed_epsilon_sigma0.5"] < 10
    assert ch4["deployed_accuracy_sigma0.5"] < 0.55
    for size in (1, 4, 8):
        assert ch4[f"rouge1_b{size}_sigma0.01"] <= ch4["noisy_rouge1_max"] <= NOTHING
    assert ch4["noisy_rouge1_high_max"] <= 0.05 and ch4["noisy_sentence_rouge1_max"] < 0.2
    # "the privatised gradient's mean cosine with the raw one rises from ... at one sentence to ... at 4
    # ... and ... at 8 (two batches, too few to rank against 4), still far below what the attack needs"
    assert ch4["cosine_b1_sigma0.01"] < min(ch4["cosine_b4_sigma0.01"], ch4["cosine_b8_sigma0.01"])
    assert max(ch4["cosine_b4_sigma0.01"], ch4["cosine_b8_sigma0.01"]) < 0.2
    assert ch4["deployed_trained_millions"] == ch4["full_numel_millions"]


def test_chapter4_a_central_dp_server_sees_what_the_raw_gradient_shows(ch4):
    # "The server's view leaks as the raw gradient does: ROUGE-1 ... against ... for chapter 3's attack ...,
    # and the paired bootstrap interval of their difference contains zero".
    assert ch4["central_rouge1_attention_query_0"] >= LARGE_PART
    assert ch4["central_minus_raw_low_attention_query_0"] <= 0 <= ch4["central_minus_raw_high_attention_query_0"]


def test_chapter4_page_rules():
    # Issue 24: short cells, code that fits the page, record plumbing hidden, numbered captioned figures
    # with alt text, each explained after it (the rules of gilib.book.pages, kept by every chapter).
    assert page_problems(repo_root() / "chapters" / "04_dp_defence.ipynb") == []


def test_chapter4_the_worked_answers_quote_what_they_computed(ch4):
    # Solution 3: "The sentence's gradient has norm ... over all parameters ..., above both clipping norms";
    # solution 4: "gives sigma ~ ...; ... epsilon = ..., just under 8"; solution 7: "the chapter's sentence
    # ... a factor of ...".
    assert ch4["sentence_norm"] > 1.0
    assert 7.5 < ch4["eps8_check"] <= 8 and 0.2 < ch4["sigma_eps8"] < 1
    assert ch4["layer0_norm_share"] < 0.5 and ch4["gain_layer0"] == pytest.approx(1 / ch4["layer0_norm_share"], rel=1e-2)
