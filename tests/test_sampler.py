"""The LatentDAPS loop on the embedded demo prior: per-particle random streams (a batch equals
single runs), the PF-ODE step, the per-step MCMC learning rate, divergence handling end to end."""
import pytest
import torch

import treedaps.sampler as sampler_mod
from treedaps.device import select_device
from treedaps.mcmc import MCMCConfig
from treedaps.models.toy import GaussianMixturePrior
from treedaps.operators import PhaseRetrieval
from treedaps.particles import Particles, Retired
from treedaps.plan import PhasePlan
from treedaps.rng import measurement_generator
from treedaps.sampler import reverse_ode, sample
from treedaps.schedules import AnnealingConfig, ODEConfig, annealing_sigmas, mcmc_lr, mcmc_ratio, ode_time_steps
from treedaps.search import SearchHooks

DEV = select_device("cpu")
SEED = 42
ANN = AnnealingConfig(num_steps=4)
ODE = ODEConfig()
MC = MCMCConfig(num_steps=5)
PLAN = PhasePlan(num_steps=4, branch_step=3)

# Batch composition vs single runs. Measured on this CPU (MKL, AVX512, 1 and 2 threads): a particle's
# final latent is bit-identical (max |diff| = 0) whether it runs in a batch of 4, alone, or in a
# batch of 2, and also after a batch-mate is retired. The only batch-dependent arithmetic is the
# mixture's float64 matmul and the batched FFT, whose blocking could change with the BLAS/FFT
# library. The tolerance is set from the measured sensitivity: perturbing z_T by 1.2e-7
# (relative, ~1 float32 ulp) moves the final latents (|z| ~ 1) by at most 3.0e-7 after these
# 4 steps, so any float32-rounding-level batch effect stays far below 1e-5; a stream mix-up moves
# them by O(sqrt(2 lr)) ~ 8e-3 per MCMC iteration and O(sigma) at re-noising: >= 1e-3.
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return GaussianMixturePrior()


@pytest.fixture(scope="module")
def operator():
    return PhaseRetrieval(2.0, 32, 0.05)


def _y(model, operator, index):
    return operator.measure(model.images[index:index + 1], measurement_generator(SEED, index))


def _particles(model, operator, index=1, num_samples=4, select=None):
    p = Particles.start(_y(model, operator, index), [index], [SEED], num_samples, model.latent_shape,
                        ANN.sigma_max, DEV)
    return p.select(select) if select is not None else p


def _run(model, operator, particles, **kw):
    return sample(model, operator, particles, ANN.sigmas(), PLAN, ODE, MC, DEV, **kw)


@pytest.fixture(scope="module")
def batch4(model, operator):
    return _run(model, operator, _particles(model, operator))


# -- PhasePlan / reverse ODE --------------------------------------------------------------------------

def test_phase_plan():
    plan = PhasePlan(num_steps=5, branch_step=3, repulsion=[1.0, 0.5, 0.0, 0.0, 0.0])
    assert [plan.phase(k) for k in range(5)] == ["explore"] * 3 + ["refine"] * 2
    assert plan.repulsion_at(1) == 0.5
    assert PhasePlan(5, 3).repulsion_at(2) == 0.0
    full = PhasePlan(5, 3, prune_step=3, prune_dry_run=True, repulsion=[1.0, 0.5, 0.0, 0.0, 0.0],
                     optimize_steps=frozenset({3, 4}))
    actions = [full.at(k) for k in range(5)]
    assert [a.prune for a in actions] == [False, False, False, True, False]
    assert all(a.prune_dry_run for a in actions) and actions[1].repulsion == 0.5
    assert [(a.optimize, a.final_pass) for a in actions] == [(False, False)] * 3 + [(True, False), (True, True)]


def test_reverse_ode_is_two_euler_steps(model):
    g = torch.Generator().manual_seed(0)
    zt = 3.0 * torch.randn(2, *model.latent_shape, generator=g)
    sigma = annealing_sigmas(50)[5]
    got = reverse_ode(model, zt, sigma, ODEConfig())
    ts = ode_time_steps(sigma, 2, 0.001, 7)
    z = zt
    for k in range(2):  # dz = (t_next - t_cur) * (z - D(z, t_cur)) / t_cur, written out by hand
        t, tn = ts[k], ts[k + 1]
        z = z + (tn - t) * (z - model.denoise(z, t)) / t
    assert torch.allclose(got, z, rtol=0, atol=1e-5)
    assert not got.requires_grad


# -- measurement ------------------------------------------------------------------------------------------

def test_measurement_independent_of_batch_and_sample_count(model, operator):
    # y for image i is measurement_generator(seed, i) on the CPU: the same for every num_samples,
    # start_id and run (the runner builds it this way; here we check its two ingredients)
    y1 = _y(model, operator, 3)
    y2 = operator.measure(model.images[3:4].clone(), measurement_generator(SEED, 3))
    assert torch.equal(y1, y2)
    clean = operator(model.images[3:4])
    assert torch.equal(y1, clean + 0.05 * torch.randn(clean.shape, generator=measurement_generator(SEED, 3)))
    # a particle set's y rows are copies of its measurement
    p = _particles(model, operator, index=3, num_samples=4)
    assert torch.equal(p.y, y1.expand(4, -1, -1, -1))


# -- paired random streams -----------------------------------------------------------------------------

def test_batch_of_four_equals_four_single_runs(model, operator, batch4):
    assert batch4.particles.ids == [0, 1, 2, 3] and not batch4.retired
    worst = 0.0
    for p in range(4):
        one = _run(model, operator, _particles(model, operator, select=[p]))
        assert one.particles.ids == [p]
        diff = (one.particles.z[0] - batch4.particles.z[p]).abs().max().item()
        worst = max(worst, diff)
        assert torch.allclose(one.loss[0], batch4.loss[p], rtol=1e-5)
    assert worst <= BATCH_ATOL, worst
    # the particles really differ from each other (the streams are not shared)
    z = batch4.particles.z
    assert min((z[a] - z[b]).abs().max().item() for a in range(4) for b in range(a + 1, 4)) > 0.1


def test_two_particles_equal_first_two_of_four(model, operator, batch4):
    two = _run(model, operator, _particles(model, operator, num_samples=2))
    assert two.particles.ids == [0, 1]
    assert torch.allclose(two.particles.z, batch4.particles.z[:2], rtol=0, atol=BATCH_ATOL)


def test_two_measurements_in_one_batch(model, operator, batch4):
    y = torch.cat([_y(model, operator, 1), _y(model, operator, 4)])
    both = Particles.start(y, [1, 4], [SEED, SEED], 2, model.latent_shape, ANN.sigma_max, DEV)
    out = _run(model, operator, both)
    assert out.particles.measurement == [0, 0, 1, 1] and out.particles.image_index == [1, 1, 4, 4]
    assert torch.allclose(out.particles.z[:2], batch4.particles.z[:2], rtol=0, atol=BATCH_ATOL)
    alone = _run(model, operator, _particles(model, operator, index=4, num_samples=2))
    assert torch.allclose(out.particles.z[2:], alone.particles.z, rtol=0, atol=BATCH_ATOL)


def test_deterministic_rerun(model, operator, batch4):
    again = _run(model, operator, _particles(model, operator))
    assert torch.equal(again.particles.z, batch4.particles.z)


def test_output_and_state(model, operator, batch4):
    out = batch4
    assert out.particles.z.shape == (4, *model.latent_shape)
    assert bool(torch.isfinite(out.particles.z).all())
    want = operator.loss(model.decode(out.particles.z), out.particles.y)
    assert torch.allclose(out.loss, want)
    # the last step re-noises with sigma 0: the final z is the last z0y
    assert torch.equal(out.particles.state.z0y, out.particles.z)
    # the final images are decoded once, in the loop, from the final latents
    assert torch.equal(out.images, model.decode(out.particles.z))


# -- what the loop passes to the MCMC, and what it reports ------------------------------------------------

def test_mcmc_called_with_daps_lr_and_sigma(model, operator, monkeypatch):
    calls = []
    real = sampler_mod.run_mcmc

    def spy(z0hat, zt, sigma, lr, **kw):
        calls.append((float(sigma), lr))
        return real(z0hat, zt, sigma, lr, **kw)

    monkeypatch.setattr(sampler_mod, "run_mcmc", spy)
    _run(model, operator, _particles(model, operator, num_samples=1))
    sig = annealing_sigmas(4)
    assert [c[0] for c in calls] == [float(s) for s in sig[:4]]
    assert [c[1] for c in calls] == [mcmc_lr(MC.lr, MC.lr_min_ratio, mcmc_ratio(k, 4)) for k in range(4)]


def test_callback_events(model, operator):
    events = []
    out = _run(model, operator, _particles(model, operator, num_samples=2),
               callback=lambda e, info: events.append((e, info["step"], info.get("phase"))))
    assert [e for e, _, _ in events] == ["step_start", "step_end"] * 4
    assert [s for _, s, _ in events] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [p for _, _, p in events][::2] == ["explore"] * 3 + ["refine"]
    assert len(out.particles) == 2


# -- divergence end to end ----------------------------------------------------------------------------------

class NaNDenoise(torch.nn.Module):
    """Wraps the toy model; its denoiser returns NaN for batch row ``row`` at annealing ``step``."""

    def __init__(self, model, step, row, ode_steps=ODE.num_steps):
        super().__init__()
        self.inner, self.bad_call, self.row, self.calls = model, step * ode_steps, row, 0
        self.latent_shape, self.image_shape = model.latent_shape, model.image_shape

    def decode(self, z):
        return self.inner.decode(z)

    def denoise(self, z, sigma):
        out = self.inner.denoise(z, sigma)
        if self.calls == self.bad_call:
            out = out.clone()
            out[self.row] = float("nan")
        self.calls += 1
        return out


class NaNDecode(torch.nn.Module):
    """Wraps the toy model; its decoder returns NaN for row ``row`` at decode call ``bad_call``
    (the MCMC calls decode once per iteration: call = step * mcmc_steps + iteration)."""

    def __init__(self, model, bad_call, row):
        super().__init__()
        self.inner, self.bad_call, self.row, self.calls = model, bad_call, row, 0
        self.latent_shape, self.image_shape = model.latent_shape, model.image_shape

    def decode(self, z):
        out = self.inner.decode(z)
        if self.calls == self.bad_call:
            self.z_at_bad_call = z[self.row].detach().clone()
            nan = torch.zeros_like(out)
            nan[self.row] = float("nan")
            out = out + nan
        self.calls += 1
        return out

    def denoise(self, z, sigma):
        return self.inner.denoise(z, sigma)


def _check_retired(out, clean, bad_id, step, index=1):
    assert out.particles.ids == [p for p in range(4) if p != bad_id]
    assert len(out.retired) == 1
    r = out.retired[0]
    assert isinstance(r, Retired)
    assert (r.status, r.step, r.particle_id, r.image_index, r.measurement) == ("diverged", step, bad_id, index, 0)
    assert r.loss is None and r.reason
    assert bool(torch.isfinite(r.z).all())
    assert bool(torch.isfinite(out.particles.z).all()) and bool(torch.isfinite(out.loss).all())
    assert torch.allclose(out.particles.z, clean.particles.z, rtol=0, atol=BATCH_ATOL)
    assert torch.allclose(out.loss, clean.loss, rtol=1e-5)
    return r


def test_nan_in_denoiser_retires_one_particle(model, operator):
    bad_id, step = 2, 1
    # z_t of particle 2 at step 1 (its last finite latent: z0hat and z0y are both NaN there)
    seen = {}
    out = sample(NaNDenoise(model, step, bad_id), operator, _particles(model, operator), ANN.sigmas(), PLAN, ODE, MC,
                 DEV, callback=lambda e, info: seen.setdefault(info["step"], info["particles"].z.clone())
                 if e == "step_start" else None)
    clean = _run(model, operator, _particles(model, operator, select=[0, 1, 3]))
    r = _check_retired(out, clean, bad_id, step)
    assert torch.equal(r.z, seen[step][bad_id])


def test_nan_in_data_gradient_retires_one_particle(model, operator):
    bad_id, step, iteration = 1, 2, 3
    wrapped = NaNDecode(model, step * MC.num_steps + iteration, bad_id)
    out = sample(wrapped, operator, _particles(model, operator), ANN.sigmas(), PLAN, ODE, MC, DEV)
    clean = _run(model, operator, _particles(model, operator, select=[0, 2, 3]))
    r = _check_retired(out, clean, bad_id, step)
    # its record is the last finite MCMC state: the z0 whose decode gave NaN (after `iteration`
    # iterations of step 2), not z_t and not z0hat
    assert torch.equal(r.z, wrapped.z_at_bad_call)


class AllNaN(NaNDenoise):
    """Every denoiser call from annealing step ``step`` on returns NaN for the whole batch."""

    def denoise(self, z, sigma):
        out = self.inner.denoise(z, sigma)
        if self.calls >= self.bad_call:
            out = torch.full_like(out, float("nan"))
        self.calls += 1
        return out


def test_all_particles_diverge_at_last_step(model, operator):
    out = sample(AllNaN(model, 3, 0), operator, _particles(model, operator, num_samples=2), ANN.sigmas(), PLAN, ODE, MC, DEV)
    assert len(out.particles) == 0 and out.loss.numel() == 0
    assert sorted(r.particle_id for r in out.retired) == [0, 1]
    assert all(r.status == "diverged" and r.step == 3 for r in out.retired)


def test_all_particles_diverge_before_last_step(model, operator):
    # regression: before commit 737020b the loop went on re-noising an empty batch and
    # Particles.randn_like_z raised "stack expects a non-empty TensorList"
    events = []
    out = sample(AllNaN(model, 0, 0), operator, _particles(model, operator, num_samples=2), ANN.sigmas(), PLAN, ODE, MC, DEV,
                 callback=lambda e, info: events.append((e, info["step"])))
    assert len(out.particles) == 0 and out.loss.numel() == 0
    assert sorted(r.particle_id for r in out.retired) == [0, 1]
    assert all(r.status == "diverged" and r.step == 0 for r in out.retired)
    assert all(bool(torch.isfinite(r.z).all()) for r in out.retired)
    assert ("step_start", 1) not in events   # nothing left to run after step 0


def test_prune_hook_called_at_prune_step(model, operator):
    """The hook contract: at plan.prune_step the hook's selection replaces the batch."""
    calls = []

    def prune(particles, step, z0y, z0hat):
        calls.append((step, len(particles)))
        # the previous step's estimates arrive as arguments, one row per particle
        assert z0y.shape == z0hat.shape == particles.z.shape and not torch.equal(z0y, z0hat)
        keep = particles.select([0, 3])
        dropped = [Retired(particles.measurement[i], *particles.key(i), status="pruned", step=step,
                           z=particles.z[i], loss=None) for i in (1, 2)]
        return keep, dropped, {0: {"kept": [0, 3]}}

    plan = PhasePlan(num_steps=4, branch_step=3, prune_step=2)
    out = sample(model, operator, _particles(model, operator), ANN.sigmas(), plan, ODE, MC, DEV,
                 hooks=SearchHooks(prune=prune))
    assert calls == [(2, 4)]
    assert out.particles.ids == [0, 3]
    assert [r.status for r in out.retired] == ["pruned", "pruned"]
