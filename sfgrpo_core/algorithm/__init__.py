"""The paper's math: pure functions, tensor in, tensor out, float32 inside, no state and no I/O.

It imports torch and nothing else of the project. Equations: docs/algorithm.md.

| module        | what                                                                        | docs/algorithm.md |
|---------------|-----------------------------------------------------------------------------|-------------------|
| sde.py        | Flow-GRPO SDE, DDIM-inspired SDE, CPS, ODE; exact Gaussian log-probs          | sections 1-3 |
| schedule.py   | the SD3 sigma grid                                                          |              |
| tweedie.py    | Tweedie x0 / x1 estimates, T'-substep ODE completion                        | section 4    |
| advantages.py | gains g_k = r_{k+1} - r_k; joint / per-step / Flow-GRPO advantages           | section 5    |
| losses.py     | the clipped GRPO loss, the KL penalty to the base model                     | section 6    |

Notation (rectified flow, SD3 convention): x_t = (1 - t) x_0 + t x_1 with t = sigma in [0, 1]; x_1 ~ N(0, I) is the
noise and x_0 the clean sample; the model predicts the velocity v = x_1 - x_0. A trajectory of T steps visits the
states at sigma_0 = 1 > sigma_1 > ... > sigma_T = 0: state 0 is the initial noise x_1, state T the final sample.
``x0_estimate`` is always a clean-sample estimate, ``x1_estimate`` a noise estimate.
"""
