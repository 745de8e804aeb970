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
