import pytest
import torch

from moespec.errors import MoespecError
from moespec.sampling import SamplingParams, make_generator, sample, target_probs


def resolved(**kw) -> SamplingParams:
    return SamplingParams(**kw).with_defaults({"do_sample": True})


# -- target_probs ------------------------------------------------------------------------------------------


def test_greedy_is_one_hot_argmax_with_lowest_index_on_ties():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [5.0, 1.0, 0.0, 5.0]])
    probs = target_probs(logits, 0.0, 0, 1.0)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_probs_sum_to_one_on_any_leading_shape():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    for t, k, p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.5, 5, 0.5)]:
        probs = target_probs(logits, t, k, p)
        assert probs.shape == logits.shape and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))


def test_top_k_1_equals_greedy():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(target_probs(logits, 0.8, 1, 1.0), target_probs(logits, 0.0, 0, 1.0))


def test_top_p_by_hand():
    # probs 0.5, 0.25, 0.125, 0.125 (exact in float32)
    logits = torch.tensor([0.125, 0.5, 0.25, 0.125]).log()
    # p=0.5: the top token alone reaches 0.5
    torch.testing.assert_close(target_probs(logits, 1.0, 0, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # p=0.6: needs the top two (0.75), renormalised to 2/3, 1/3
    torch.testing.assert_close(target_probs(logits, 1.0, 0, 0.6), torch.tensor([0.0, 2 / 3, 1 / 3, 0.0]))
    # p=0.8: top three; of the tied 0.125s the lower index is kept
    torch.testing.assert_close(target_probs(logits, 1.0, 0, 0.8), torch.tensor([1 / 7, 4 / 7, 2 / 7, 0.0]))
    # tiny p still keeps one token
    torch.testing.assert_close(target_probs(logits, 1.0, 0, 1e-6), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_top_k_then_top_p_is_on_renormalised_distribution():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-k 2 leaves 4/7, 3/7; top-p 0.5 on that keeps just the first (on the raw probs it would need 0.4+0.3)
    torch.testing.assert_close(target_probs(logits, 1.0, 2, 0.5), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_matches_transformers_warpers_on_random_logits():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 200, generator=gen) * 3
    for t, k, p in [(1.0, 20, 1.0), (0.7, 0, 0.9), (1.5, 50, 0.8), (0.9, 5, 0.3), (1.0, 0, 0.99)]:
        scores = TemperatureLogitsWarper(t)(None, logits.clone())
        if k > 0:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1.0:
            scores = TopPLogitsWarper(p)(None, scores)
        expected = torch.softmax(scores, dim=-1)
        torch.testing.assert_close(target_probs(logits, t, k, p), expected, rtol=1e-5, atol=1e-7)


# -- sample ------------------------------------------------------------------------------------------------


def test_sample_greedy_equals_argmax_and_uses_no_randomness():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    gen = make_generator(7)
    before = gen.get_state().clone()
    out = sample(logits, [resolved(temperature=0.0)] * 3, [gen] * 3)
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(-1))
    assert torch.equal(gen.get_state(), before)


def draw(seed: int, n: int = 30, vocab: int = 1000) -> list[int]:
    gen = make_generator(seed)
    flat = torch.zeros(1, vocab)
    return [int(sample(flat, [resolved()], [gen])[0]) for _ in range(n)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    assert draw(123) == draw(123)
    assert draw(123) != draw(124)


def test_unseeded_generators_follow_torch_manual_seed():
    torch.manual_seed(0)
    a = make_generator(None).initial_seed()
    torch.manual_seed(0)
    assert make_generator(None).initial_seed() == a


def test_row_sampled_alone_equals_row_in_batch():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    params = [resolved(temperature=0.9), resolved(temperature=0.0), resolved(top_k=10), resolved(top_p=0.8)]
    seeds = [11, 12, 13, 14]
    gens = [make_generator(s) for s in seeds]
    batched = [sample(logits, params, gens).tolist() for _ in range(5)]
    for row in range(4):
        g = make_generator(seeds[row])
        alone = [int(sample(logits[row : row + 1], [params[row]], [g])[0]) for _ in range(5)]
        assert alone == [step[row] for step in batched]


def test_empirical_frequencies_match_target_probs():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = resolved(temperature=0.8, top_k=4)
    expected = target_probs(logits[0], 0.8, 4, 1.0)
    gen = make_generator(5)
    n = 20_000
    counts = torch.bincount(torch.cat([sample(logits, [params], [gen]) for _ in range(n)]), minlength=5)
    # 4.5 standard deviations of a binomial proportion (~1e-5 flake chance); the top-k'd token is never drawn.
    tol = 4.5 * (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= tol).all(), (counts / n, expected)


# -- SamplingParams -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 1.5),
        ("top_p", 0.0),
        ("top_k", -2),
        ("max_new_tokens", 0),
        ("seed", -1),
        ("stop", ["ok", ""]),
        ("stop", ""),
    ],
)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(MoespecError, match=f"invalid sampling value: {field}="):
        SamplingParams(**{field: value}).validate()


def test_validate_message_format():
    with pytest.raises(MoespecError) as e:
        SamplingParams(top_p=1.5).validate()
    assert str(e.value) == "invalid sampling value: top_p=1.5 (must be in (0, 1])"


def test_validate_accepts_defaults_and_disabled_top_k():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=1, seed=0, stop="x").validate()
    SamplingParams().with_defaults({}).validate()


def test_with_defaults_do_sample_false_is_greedy():
    gen_config = {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2]}
    p = SamplingParams(stop="###").with_defaults(gen_config)
    assert p.is_greedy and p.temperature == 0.0
    assert p.top_p == 0.9 and p.top_k == 0 and p.max_new_tokens == 256
    assert p.stop == ["###"] and p.stop_token_ids == []
    assert SamplingParams().with_defaults({}).is_greedy  # nothing said: greedy, as transformers


def test_with_defaults_do_sample_true_reads_config_and_keeps_request_values():
    gen_config = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64}
    p = SamplingParams().with_defaults(gen_config)
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens) == (0.6, 0.95, 20, 64)
    assert not p.is_greedy
    q = SamplingParams(temperature=0.0, top_k=-1, max_new_tokens=5).with_defaults(gen_config)
    assert (q.temperature, q.top_p, q.top_k, q.max_new_tokens) == (0.0, 0.95, 0, 5)
    assert SamplingParams().with_defaults({"do_sample": True}).temperature == 1.0
    # the original is not modified
    orig = SamplingParams()
    orig.with_defaults(gen_config)
    assert orig.temperature is None and orig.stop is None
