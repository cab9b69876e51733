"""Step rewards (docs/algorithm.md section 4): which image each r_k scores, r_0 once per group, batching, reward
calls."""

import dataclasses

import pytest
import torch

from sfgrpo_core.algorithm import advantages, tweedie
from sfgrpo_core.algorithm.schedule import flow_sigmas
from sfgrpo_core.algorithm.sde import get_step_function
from sfgrpo_core.config import CreditConfig
from sfgrpo_core.models.toy import ToyVelocityNet, ToyWorld, prompt_mode
from sfgrpo_core.training.credit import CREDIT_METHODS
from sfgrpo_core.training.rollout import make_prompt_batch, rollout
from sfgrpo_core.training.step_rewards import BatchSizes, distinct_states, scored_states, step_rewards

PROMPTS = ["mode 0", "mode 3", "mode 5"]
GROUP_SIZE, STEPS, SUBSTEPS = 3, 4, 3


def toy_world(seed: int = 0) -> ToyWorld:
    """A randomly initialised toy world (no pretraining): a real conditioned MLP VelocityModel, built at once."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyWorld(ToyVelocityNet(hidden=16).requires_grad_(False))


class RecordingReward:
    """Records every (image, prompt) it scores; the score identifies both: x + 3.7 y + 0.5 mode(prompt)."""

    def __init__(self):
        self.images: list[torch.Tensor] = []
        self.prompts: list[str] = []
        self.call_sizes: list[int] = []

    def __call__(self, images, prompts, metadata=None):
        self.images.append(images.detach().clone())
        self.prompts += list(prompts)
        self.call_sizes.append(len(prompts))
        return score_of(images, prompts)

    @property
    def scored(self) -> int:
        return sum(self.call_sizes)


def score_of(points: torch.Tensor, prompts) -> torch.Tensor:
    modes = torch.tensor([float(prompt_mode(prompt)) for prompt in prompts])
    return points[:, 0] + 3.7 * points[:, 1] + 0.5 * modes


def _rollout(model, sde="flow_grpo", shared_noise=True):
    # None: make_prompt_batch's one draw per group; else one draw per member.
    noise = None if shared_noise else torch.randn(len(PROMPTS) * GROUP_SIZE, 2,
                                                  generator=torch.Generator().manual_seed(5))
    batch = make_prompt_batch(model, PROMPTS, GROUP_SIZE, seed=0, iteration=0, initial_noise=noise)
    return rollout(model, batch, flow_sigmas(STEPS), get_step_function(sde, 0.7))


def _completion(model, recorded, k):
    """State k of every member completed by hand: T' Euler substeps from sigma_k with the member's condition."""
    condition = recorded.batch.condition

    def velocity_fn(x, sigma):
        return model.velocity(x, sigma, condition)

    return tweedie.complete(velocity_fn, recorded.states[:, k], recorded.sigmas[k], SUBSTEPS)


def _expected_items(model, recorded, shared_noise):
    """(image, prompt) of everything that should be scored: r_0 once per group (its first member) when the group
    shares x_1, else once per member; r_1..r_{T-1} the completions of every member's states; r_T every final
    sample."""
    prompts, group_ids = recorded.batch.prompts, recorded.batch.group_ids
    first = [int(torch.nonzero(group_ids == group)[0, 0]) for group in torch.unique(group_ids)]
    if not shared_noise:
        first = list(range(len(prompts)))
    images = [_completion(model, recorded, 0)[first]]
    item_prompts = [prompts[i] for i in first]
    for k in range(1, STEPS):
        images.append(_completion(model, recorded, k))
        item_prompts += prompts
    images.append(recorded.states[:, STEPS])
    item_prompts += prompts
    return torch.cat(images), item_prompts


def _sorted_items(images, prompts):
    key = torch.tensor([100.0 * prompt_mode(prompt) for prompt in prompts]) + images[:, 0]
    order = torch.argsort(key)
    return images[order], [prompts[i] for i in order.tolist()]


@pytest.mark.parametrize("shared_noise", [True, False])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_every_reward_lands_in_its_member_and_step_cell(batch_size, shared_noise):
    """r_k scores the T'-substep completion of state k at sigma_k, r_0 is the group's (broadcast to its members)
    when the group shares x_1, r_T the final sample, with prompts aligned; a batch size that divides neither the
    30 completions nor the 39 scored images (shared x_1) loses and misplaces nothing."""
    model = toy_world()
    recorded = _rollout(model, shared_noise=shared_noise)
    reward = RecordingReward()
    sizes = BatchSizes(samples=batch_size, rewards=batch_size + 2)
    result = step_rewards(model, recorded, reward, substeps=SUBSTEPS, batch_sizes=sizes).scores.values

    prompts = recorded.batch.prompts
    assert result.shape == (len(prompts), STEPS + 1)
    for k in range(STEPS):
        torch.testing.assert_close(result[:, k], score_of(_completion(model, recorded, k), prompts))
    torch.testing.assert_close(result[:, STEPS], score_of(recorded.states[:, STEPS], prompts), rtol=0, atol=0)
    # Members sharing x_1 get their group's one r_0; with independent x_1 every member has its own.
    r0 = result[:, 0].reshape(len(PROMPTS), GROUP_SIZE)
    assert bool((r0 == r0[:, :1]).all()) == shared_noise
    assert len(torch.unique(r0)) == (len(PROMPTS) if shared_noise else len(PROMPTS) * GROUP_SIZE)

    assert max(reward.call_sizes) <= batch_size + 2
    expected_images, expected_prompts = _sorted_items(*_expected_items(model, recorded, shared_noise))
    scored_images, scored_prompts = _sorted_items(torch.cat(reward.images), reward.prompts)
    # The same multiset: nothing lost or scored twice (a shared r_0 once per group, not once per member).
    assert scored_prompts == expected_prompts
    torch.testing.assert_close(scored_images, expected_images)


def test_a_shared_r0_is_scored_once_per_group_with_its_prompt():
    model = toy_world()
    recorded = _rollout(model)
    reward = RecordingReward()
    step_rewards(model, recorded, reward, substeps=SUBSTEPS, batch_sizes=BatchSizes(64, 64))
    scored = torch.cat(reward.images)
    r0_images = _completion(model, recorded, 0)
    for group, prompt in enumerate(PROMPTS):
        member = group * GROUP_SIZE
        matches = [i for i in range(len(scored)) if torch.allclose(scored[i], r0_images[member], atol=1e-5, rtol=0)]
        assert len(matches) == 1, (prompt, matches)
        assert reward.prompts[matches[0]] == prompt


def test_one_substep_scores_the_tweedie_estimate():
    model = toy_world()
    recorded = _rollout(model)
    result = step_rewards(model, recorded, RecordingReward(), substeps=1,
                          batch_sizes=BatchSizes(5, 5)).scores.values
    k = 2
    sigma = recorded.sigmas[k].expand(len(recorded.batch.prompts))
    x0_hat = tweedie.x0_estimate(recorded.states[:, k], model.velocity(recorded.states[:, k], sigma,
                                                                        recorded.batch.condition), sigma)
    torch.testing.assert_close(result[:, k], score_of(x0_hat, recorded.batch.prompts))


@pytest.mark.parametrize("method", ["stepwise", "flow_grpo"])
@pytest.mark.parametrize("shared_noise", [True, False])
@pytest.mark.parametrize("batch_size", [4, 64])
def test_reported_reward_calls_count_the_images_scored(method, shared_noise, batch_size):
    model = toy_world()
    recorded = _rollout(model, shared_noise=shared_noise)
    reward = RecordingReward()
    credit = CREDIT_METHODS[method](model, recorded, reward, CreditConfig(method=method, substeps=SUBSTEPS),
                                    BatchSizes(batch_size, batch_size))
    assert reward.scored > 0 and credit.reward_calls == reward.scored


def test_stepwise_advantages_are_nan_exactly_where_the_rollout_is_inactive():
    model = toy_world()
    recorded = _rollout(model, sde="ddim")  # step 0 (t = 1) and the last step are deterministic
    credit = CREDIT_METHODS["stepwise"](model, recorded, RecordingReward(), CreditConfig(substeps=SUBSTEPS),
                                        BatchSizes(64, 64))
    assert not recorded.active[:, 0].any() and not recorded.active[:, -1].any() and recorded.active.any()
    assert torch.equal(torch.isfinite(credit.advantages), recorded.active)


class CountingModel:
    """Wraps a VelocityModel and counts the samples its velocity is evaluated on."""

    def __init__(self, model):
        self.model, self.samples = model, 0

    def velocity(self, x, sigma, condition):
        self.samples += x.shape[0]
        return self.model.velocity(x, sigma, condition)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("substeps", [1, 2, 3])
def test_completions_start_from_the_rollouts_velocity(substeps):
    """The first substep of every completion is the rollout's own velocity at that state: T' = 1 costs no model
    call, T' substeps cost T' - 1 per distinct state; the rewards are those of completions made from scratch."""
    model = toy_world()
    recorded = _rollout(model)
    counting = CountingModel(model)
    result = step_rewards(counting, recorded, RecordingReward(), substeps=substeps,
                          batch_sizes=BatchSizes(7, 7)).scores.values
    assert counting.samples == (substeps - 1) * len(distinct_states(recorded)[0])
    condition = recorded.batch.condition
    for k in range(STEPS):
        from_scratch = tweedie.complete(lambda x, sigma: model.velocity(x, sigma, condition), recorded.states[:, k],
                                        recorded.sigmas[k], substeps)
        torch.testing.assert_close(result[:, k], score_of(from_scratch, recorded.batch.prompts))


@pytest.mark.parametrize(("sde", "shared_noise", "distinct_per_group"), [
    ("ddim", True, [1, 1, GROUP_SIZE, GROUP_SIZE]),  # shared x_1, and the DDIM step from t = 1 is deterministic
    ("flow_grpo", True, [1, GROUP_SIZE, GROUP_SIZE, GROUP_SIZE]),  # its first step already draws noise
    ("ddim", False, [GROUP_SIZE] * STEPS),
])
def test_states_a_group_shares_are_completed_and_scored_once(sde, shared_noise, distinct_per_group):
    model = toy_world()
    recorded = _rollout(model, sde=sde, shared_noise=shared_noise)
    members, steps, index = distinct_states(recorded)
    assert [int((steps == k).sum()) for k in range(STEPS)] == [len(PROMPTS) * n for n in distinct_per_group]
    # every (member, step) points at a distinct state equal to its own, of its own group and step
    assert torch.equal(steps[index], torch.arange(STEPS).expand(len(recorded.batch.prompts), STEPS))
    group_ids = recorded.batch.group_ids
    assert torch.equal(group_ids[members[index]], group_ids[:, None].expand(-1, STEPS))
    for member in range(len(group_ids)):
        for k in range(STEPS):
            assert torch.equal(recorded.states[members[index[member, k]], k], recorded.states[member, k])
    reward = RecordingReward()
    result = step_rewards(model, recorded, reward, substeps=SUBSTEPS, batch_sizes=BatchSizes(64, 64))
    assert reward.scored == result.images == len(members) + len(group_ids)


def test_scored_states_are_the_ends_of_active_transitions_and_the_finals():
    active = torch.tensor([[False, True, False, False], [False, False, False, True], [False] * 4])
    expected = torch.tensor([[False, True, True, False, True],
                             [False, False, False, True, True],
                             [False, False, False, False, True]])
    assert torch.equal(scored_states(active), expected)


@pytest.mark.parametrize("normalization", ["joint", "per_step"])
@pytest.mark.parametrize("sde", ["ddim", "flow_grpo"])
def test_scoring_only_the_states_the_loss_uses_leaves_the_advantages_unchanged(sde, normalization):
    """Stepwise credit scores r_k only at the ends of active transitions (and the finals): the advantages equal
    those made from every state's reward, the states it skips are NaN and not counted as missing, and it scores
    fewer images when no transition next to a state trains (DDIM: the step from t = 1, so r_0 is skipped)."""
    model = toy_world()
    recorded = _rollout(model, sde=sde)
    config = CreditConfig(substeps=SUBSTEPS, normalization=normalization)
    reward = RecordingReward()
    credit = CREDIT_METHODS["stepwise"](model, recorded, reward, config, BatchSizes(5, 5))
    every_state = step_rewards(model, recorded, RecordingReward(), substeps=SUBSTEPS, batch_sizes=BatchSizes(64, 64))
    kept = len(distinct_states(recorded, scored_states(recorded.active))[0]) + len(recorded.batch.prompts)
    normalize = advantages.joint_advantages if normalization == "joint" else advantages.per_step_advantages
    expected = normalize(advantages.stepwise_gains(every_state.scores.values), recorded.batch.group_ids,
                         mask=recorded.active)
    torch.testing.assert_close(credit.advantages, expected, equal_nan=True)
    scored = scored_states(recorded.active)
    assert torch.equal(torch.isfinite(credit.rewards), scored) and credit.missing == 0
    torch.testing.assert_close(credit.rewards[scored], every_state.scores.values[scored])
    assert reward.scored == credit.reward_calls == kept
    if sde == "ddim":
        assert not scored[:, 0].any() and scored[:, 1:].all()
        assert credit.reward_calls < every_state.images


def test_a_reward_that_fails_on_a_scored_state_is_missing_and_a_skipped_state_is_not():
    model = toy_world()
    recorded = _rollout(model, sde="ddim")

    def failing_on_first(images, prompts, metadata=None):
        scores = score_of(images, prompts)
        scores[0] = float("nan")
        return scores

    credit = CREDIT_METHODS["stepwise"](model, recorded, failing_on_first, CreditConfig(substeps=SUBSTEPS),
                                        BatchSizes(64, 64))
    # the first image scored is group 0's state 1 (after the deterministic DDIM step), shared by its members
    assert credit.missing == GROUP_SIZE and torch.isnan(credit.rewards[:GROUP_SIZE, 1]).all()
    assert int(torch.isnan(credit.rewards).sum()) > credit.missing  # the skipped states are NaN too, not missing


def test_grid_completions_run_the_rest_of_the_sampling_grid():
    """completion="grid" (DenseGRPO's): state k is completed by the ODE over sigma_k > ... > 0, reusing the
    rollout's velocity, so it costs T - k - 1 model calls per distinct state; its rewards are those of that ODE."""
    model = toy_world()
    recorded = _rollout(model, sde="ddim")
    counting = CountingModel(model)
    result = step_rewards(counting, recorded, RecordingReward(), substeps=SUBSTEPS, batch_sizes=BatchSizes(7, 7),
                          completion="grid").scores.values
    _, steps, _ = distinct_states(recorded)
    assert counting.samples == int((STEPS - steps - 1).sum())
    for k in range(STEPS):
        from_state_k = dataclasses.replace(recorded.batch, initial_noise=recorded.states[:, k])
        ode = rollout(model, from_state_k, recorded.sigmas[k:], get_step_function("ode", 0.0)).final
        torch.testing.assert_close(result[:, k], score_of(ode, recorded.batch.prompts), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="completion"):
        step_rewards(model, recorded, RecordingReward(), substeps=1, batch_sizes=BatchSizes(7, 7), completion="dense")
