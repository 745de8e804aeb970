import pytest
import torch

from densegrpo_fast.rewards import REWARDS, CombinedReward, RewardError, register


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r, parts = CombinedReward({"jpeg_compressibility": 1.0})(torch.cat([flat, noisy]), ["a", "b"])
    assert r.shape == (2,) and r[0] > r[1] and r[1] < 0
    torch.testing.assert_close(parts["jpeg_compressibility"], r)


def test_weights_combine():
    img = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a, _ = CombinedReward({"jpeg_compressibility": 1.0})(img, ["x"] * 3)
    b, _ = CombinedReward({"jpeg_compressibility": 0.5, "jpeg_incompressibility": 0.25})(img, ["x"] * 3)
    torch.testing.assert_close(b, 0.5 * a - 0.25 * a)


@pytest.fixture
def broken_rewards():
    @register("test_raises")
    def _raises(_):
        def f(images, prompts):
            raise IOError("reward server down")
        return f

    @register("test_nan")
    def _nan(_):
        def f(images, prompts):
            return torch.tensor([1.0, float("nan")])
        return f
    yield
    REWARDS.pop("test_raises")
    REWARDS.pop("test_nan")


def test_failing_or_nan_reward_is_a_clear_error(broken_rewards):
    img = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardError, match="reward 'test_raises' failed.*reward server down"):
        CombinedReward({"test_raises": 1.0})(img, ["a", "b"])
    with pytest.raises(RewardError, match=r"reward 'test_nan' returned NaN/inf for images \[1\]"):
        CombinedReward({"test_nan": 1.0})(img, ["a", "b"])
    fut = CombinedReward({"test_nan": 1.0}).submit(img, ["a", "b"])
    with pytest.raises(RewardError):
        fut.result()


def test_components_weight_and_report_each_part():
    """reward.components: each component scored, weighted into the total; the rollout reports each component's
    raw scores of the final images."""
    from concurrent.futures import Future
    from densegrpo_fast.rollout.driver import RolloutResult
    from densegrpo_fast.rewards import CombinedReward
    imgs = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    r = CombinedReward({}, components={"jpeg_compressibility": {"weight": 0.5},
                                       "inc": {"weight": 0.25, "type": "jpeg_incompressibility"}})
    total, parts = r(imgs, ["x"] * 4)
    torch.testing.assert_close(total, 0.5 * parts["jpeg_compressibility"] + 0.25 * parts["inc"])
    torch.testing.assert_close(parts["inc"], -parts["jpeg_compressibility"])
    assert r.calls == 1 and r.images == 4
    f = Future()
    f.set_result((torch.arange(6.0), {"a": torch.arange(6.0)}))  # 2 rows x R = 3 columns
    res = RolloutResult(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(1), None, [f], score_cols=3)
    torch.testing.assert_close(res.component_scores()["a"], torch.tensor([2.0, 5.0]))  # the final column


def test_latents_are_decoded_and_scored_in_the_reward_thread():
    """reward.submit(latents, prompts, decode=...): the decode runs in the reward thread (the rollout driver's one
    decode-and-score path, rollout.driver.score), and the scores are those of the images decode gives."""
    import threading
    from types import SimpleNamespace
    from densegrpo_fast.rollout.driver import score
    where = []

    def decode(z):
        where.append(threading.current_thread().name)
        return z.sigmoid()

    lat = torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(4))   # (b, R, ...)
    r = CombinedReward({"jpeg_compressibility": 1.0})
    ctx = SimpleNamespace(reward=r, models=SimpleNamespace(decode=decode))
    total, _ = score(ctx, lat, ["a", "b"]).result()
    want, _ = r(lat.flatten(0, 1).sigmoid(), ["a"] * 3 + ["b"] * 3)
    assert torch.equal(total, want) and r.calls == 2 and r.images == 12
    assert where and all(w.startswith("reward") for w in where)
    r.close()


def test_component_config_errors_name_the_key():
    from densegrpo_fast.config import ConfigError, load_config
    from conftest import ROOT
    cases = [
        ("reward.components={jpeg_compressibility: {weight: 1, colour: red}}",
         "reward.components.jpeg_compressibility: unknown key"),
        ("reward.components={jpeg_compressibility: {type: jpeg_compressibility}}",
         "reward.components.jpeg_compressibility.weight: expected a number"),
        ("reward.components={mine: {weight: 1, type: nope}}", "reward.components.mine: unknown reward type 'nope'"),
    ]
    for override, needle in cases:
        with pytest.raises(ConfigError) as exc:
            load_config(f"{ROOT}/configs/tiny_jpeg.yaml", [override, "reward.weights={jpeg_compressibility: 1.0}"])
        assert needle in str(exc.value)
    with pytest.raises(ConfigError, match="reward.weights and reward.components are both set"):
        load_config(f"{ROOT}/configs/tiny_jpeg.yaml", ["reward.weights={jpeg_incompressibility: 2.0}",
                                                       "reward.components={jpeg_compressibility: {weight: 1}}"])
