"""The label read-out: each option's label scored as the continuation of the prefill, on the shared-prefix KV cache,
equals the log-likelihood of the whole sequence computed the slow way (one plain forward over it); batch-invariant;
and the templates written for it (no digits) and the letters family of the digit read-out."""
import pytest
import torch

from culign.model import scoring
from culign.scorer import SurveyScorer
from culign.survey import ANSWERS, DEFAULT_LABEL_SPLIT, Survey, both_orders


@pytest.fixture(scope="module")
def survey():
    return Survey.load()


def slow_loglik(rt, ids, cont, prompt=None):
    """log p(cont | ids) by one forward over the whole sequence (no cache, no padding)."""
    embed = rt.model.get_input_embeddings()
    full = torch.tensor(list(ids) + list(cont))
    e = embed(full).float()
    if prompt is not None:
        e = torch.cat([prompt.float(), e])
    with torch.inference_mode():
        logits = rt.model(inputs_embeds=e.unsqueeze(0)).logits[0].float().log_softmax(-1)
    start = e.shape[0] - len(cont)
    return float(sum(logits[start - 1 + j, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("name", ["vsm/label_chat/asc", "plain/label_interview/desc"])
def test_label_readout_equals_full_sequence_loglik(word_runtime, survey, name):
    rt = word_runtime
    scorer = SurveyScorer(rt, survey, [name], answer_cache=None)
    p = scorer.prepared[name]
    g = torch.Generator().manual_seed(3)
    prompts = torch.randn(3, 2, rt.hidden_size, generator=g) * 0.05
    for sp in (None, prompts):
        parts = scoring.continuation_logprobs(rt, p.shared,
                                              [(gr.prefix, gr.suffixes, gr.continuations) for gr in p.groups],
                                              sp, block=2)
        for gr, part in zip(p.groups, parts):
            for q, pos in enumerate(gr.positions[:3]):
                item = survey.items[pos]
                ids = rt.chat_ids(p.presentation.messages(item.id), p.presentation.prefill)
                assert ids == p.shared + gr.prefix + gr.suffixes[q]
                for k, a in enumerate(ANSWERS):
                    cont = gr.continuations[q][k]
                    assert len(cont) >= 1
                    for s in range(1 if sp is None else 3):
                        want = slow_loglik(rt, ids, cont, None if sp is None else sp[s])
                        assert part[s, q, k].item() == pytest.approx(want, abs=1e-4, rel=1e-5)


def test_label_readout_is_batch_invariant(word_runtime, survey):
    name = "vsm/label_chat/asc"
    scorer = SurveyScorer(word_runtime, survey, [name], answer_cache=None)
    prompts = torch.randn(5, 2, word_runtime.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.05
    together = scorer.answers(prompts, [name])[name]
    for s in (0, 4):
        alone = scorer.answers(prompts[s:s + 1], [name])[name]
        assert torch.allclose(alone.expected[0], together.expected[s], atol=1e-6)
        assert torch.allclose(alone.mass[0], together.mass[s], rtol=1e-5)


def test_label_answers_mean_the_label_in_either_order(word_runtime, survey):
    """Continuation k is the label of answer k: a reversed listing changes the prompt, never what k means."""
    scorer = SurveyScorer(word_runtime, survey, ["vsm/label_chat/asc", "vsm/label_chat/desc"], answer_cache=None)
    for name in scorer.names:
        p = scorer.prepared[name]
        assert p.readout == "label" and p.answer_of_digit.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
        a = scorer.answers(None, [name])[name]
        assert ((a.expected >= 1) & (a.expected <= 5)).all() and ((a.mass > 0) & (a.mass <= 1)).all()
    asc, desc = (scorer.prepared[n].presentation for n in scorer.names)
    first = survey.items[0]
    assert asc.options(first.id).splitlines()[0].endswith(first.scale[1])
    assert desc.options(first.id).splitlines()[0].endswith(first.scale[5])
    assert not any(ch.isdigit() for ch in asc.options(first.id))


def test_letters_template_reads_letters(survey, word_runtime):
    p = survey.presentation("vsm/letters/desc")
    assert p.readout == "digit" and p.options(1).splitlines()[0].startswith("(A) ")
    assert p.options(1).splitlines()[0].endswith(p.item(1).scale[5])  # desc: A means answer 5


def test_label_split_and_order_balanced_split_cannot_leak(survey):
    assert DEFAULT_LABEL_SPLIT.leaks() == []
    assert all(survey.readout_of(n) == "label" for n in DEFAULT_LABEL_SPLIT.all_names)
    for base in (DEFAULT_LABEL_SPLIT, survey.split()):
        both = both_orders(base)
        assert both.leaks() == []
        assert {n.rsplit("/", 1)[1] for n in both.train} == {"asc", "desc"}
        assert "order:desc" not in both.heldout and both.heldout
        train_wordings = {n.split("/")[0] for n in both.train}
        train_templates = {n.split("/")[1] for n in both.train}
        assert all(n.split("/")[0] not in train_wordings for n in both.heldout["wording:formal"])
        for fam, names in both.heldout.items():
            if fam.startswith("template:"):
                assert all(n.split("/")[1] not in train_templates for n in names)
            assert not set(names) & set(both.train)


def test_readout_filters_patterns(survey):
    assert all(survey.readout_of(n) == "label" for n in survey.expand(["vsm/*/asc"], "label"))
    with pytest.raises(ValueError, match="digit read-out, not label"):
        survey.split(train=["vsm/chat/asc"], readout="label")
    assert survey.split(readout="label") == DEFAULT_LABEL_SPLIT
