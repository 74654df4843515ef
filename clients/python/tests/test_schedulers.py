"""diffusers scheduler objects passed as ``scheduler=``: mapped through ``ListModels``
(``ModelInfo.scheduler_info``) with their config honoured, or refused with a ``ValueError`` that
names the setting.

The suite runs without diffusers or torch, so the scheduler objects here are stand-ins: classes
with diffusers' class names and ``__init__`` defaults whose ``config`` is filled in the way
diffusers' ``register_to_config`` fills it (every argument, plus ``_use_default_values``: the
arguments the caller did not pass), and a ``from_config`` that passes a config's keys on as
diffusers' does. The client reads nothing else from a scheduler object: its class name and its
``config``.
"""

import json

import numpy as np
import pytest

from conftest import FIXTURES, SD15, SDXL, png_diff, rel_diff
from stepstream import RemotePipeline

TOL = 1e-5

_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    steps_offset=0,
)


class _StandIn:
    """A diffusers-like scheduler: ``config`` and ``from_config`` only (see the module doc)."""

    defaults: dict = {}

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        config = {**self.defaults, **kwargs}
        unused = [k for k in self.defaults if k not in kwargs]
        if unused:
            config["_use_default_values"] = unused
        config["_class_name"] = type(self).__name__
        self.config = config

    @classmethod
    def from_config(cls, config, **kwargs):
        # diffusers drops the keys the source config held only as defaults, passes on the ones
        # this class takes and keeps the others in the config as well.
        used_defaults = set(config.get("_use_default_values", ()))
        given = {k: v for k, v in config.items() if k not in used_defaults and not k.startswith("_")}
        obj = cls(**{**{k: v for k, v in given.items() if k in cls.defaults}, **kwargs})
        for k, v in given.items():
            obj.config.setdefault(k, v)
        return obj


class DDIMScheduler(_StandIn):
    defaults = dict(_COMMON, clip_sample=True, set_alpha_to_one=True, thresholding=False,
                    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                    timestep_spacing="leading", rescale_betas_zero_snr=False)


class DDPMScheduler(_StandIn):
    defaults = dict(_COMMON, variance_type="fixed_small", clip_sample=True, thresholding=False,
                    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                    timestep_spacing="leading", rescale_betas_zero_snr=False)


class EulerDiscreteScheduler(_StandIn):
    defaults = dict(_COMMON, interpolation_type="linear", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                    sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                    rescale_betas_zero_snr=False, final_sigmas_type="zero")


class DPMSolverMultistepScheduler(_StandIn):
    defaults = dict(_COMMON, solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995,
                    sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                    use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace",
                    rescale_betas_zero_snr=False, use_dynamic_shifting=False,
                    time_shift_type="exponential")


class HeunDiscreteScheduler(_StandIn):
    defaults = dict(_COMMON, use_karras_sigmas=False, timestep_spacing="linspace")


def model_scheduler_config(model: str) -> dict:
    """What diffusers' ``pipe.scheduler.config`` holds for a fixture model: its file."""
    return json.loads((FIXTURES / "models" / model / "scheduler" / "scheduler_config.json").read_text())


def run(pipe, scheduler, case=None, **kw):
    """One call with ``scheduler=``; returns (the server's scheduler name, the output)."""
    used = []

    def note(p, i, t, k):
        used.append(p.accepted.scheduler)
        return k

    args = case.call_args() if case is not None else dict(prompt="a cat", num_inference_steps=2)
    args.update(kw)
    out = pipe(**args, scheduler=scheduler, callback_on_step_end=note, callback_on_step_end_steps=[0],
               return_latents=True)
    return used[0], out


@pytest.fixture
def sd15(target):
    with RemotePipeline(target, model=SD15, tensor_format="numpy") as p:
        yield p


@pytest.fixture
def sdxl(target):
    with RemotePipeline(target, model=SDXL, tensor_format="numpy") as p:
        yield p


def test_list_models_describes_each_scheduler_of_each_model(sd15):
    models = sd15.list_models()
    assert {m.id for m in models.models} == {SD15, SDXL}
    for m in models.models:
        assert [s.name for s in m.scheduler_info] == list(m.schedulers)
        by_name = {s.name: (s.diffusers_class, json.loads(s.config_json)) for s in m.scheduler_info}
        assert by_name["ddpm"][0] == "DDPMScheduler"
        (cls, plain), (cls_k, karras) = by_name["dpmpp_2m"], by_name["dpmpp_2m_karras"]
        assert cls == cls_k == "DPMSolverMultistepScheduler"
        assert [k for k in plain if plain[k] != karras[k]] == ["use_karras_sigmas"]
        assert (plain["use_karras_sigmas"], karras["use_karras_sigmas"]) == (False, True)
        assert plain["algorithm_type"] == "dpmsolver++" and plain["solver_order"] == 2
        # The model's own settings, which a freshly built DPMSolverMultistepScheduler lacks.
        own = model_scheduler_config(m.id)
        for key in ("timestep_spacing", "steps_offset", "beta_schedule", "beta_start", "prediction_type"):
            assert plain[key] == own[key], (m.id, key)
        assert plain["prediction_type"] == m.prediction_type


def test_dpm_with_karras_sigmas_runs_the_karras_case(sd15, case):
    c = case("dpmpp2m-karras-10")
    # The golden case's scheduler, made as the recording made it.
    sched = DPMSolverMultistepScheduler.from_config(
        model_scheduler_config(SD15), algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    name, out = run(sd15, sched, c)
    assert name == "dpmpp_2m_karras"
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    # The example: built directly, Karras sigmas are not dropped either.
    assert run(sd15, DPMSolverMultistepScheduler(use_karras_sigmas=True))[0] == "dpmpp_2m_karras"


def test_dpm_without_karras_runs_the_plain_case(sd15, case):
    c = case("dpmpp2m-10")
    sched = DPMSolverMultistepScheduler.from_config(model_scheduler_config(SD15), algorithm_type="dpmsolver++",
                                                    solver_order=2)
    name, out = run(sd15, sched, c)
    assert name == "dpmpp_2m"
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    assert run(sd15, DPMSolverMultistepScheduler())[0] == "dpmpp_2m"


def test_ddim_object_class_and_name_all_run_ddim(sd15, case):
    c = case("ddim-10")
    for sched in (DDIMScheduler.from_config(model_scheduler_config(SD15)), DDIMScheduler(), DDIMScheduler, "ddim"):
        name, out = run(sd15, sched, c)
        assert name == "ddim", sched
        assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
        assert png_diff(out.images[0], c) <= 1


def test_a_scheduler_name_still_works(sd15, case):
    c = case("euler-10")
    name, out = run(sd15, "euler", c)
    assert name == "euler"
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL


def test_ddpm_maps_too(sd15):
    assert run(sd15, DDPMScheduler())[0] == "ddpm"


def test_sdxl_maps_its_own_config(sdxl, case):
    c = case("euler-10", SDXL)
    name, out = run(sdxl, EulerDiscreteScheduler.from_config(model_scheduler_config(SDXL)), c)
    assert name == "euler"
    assert rel_diff(out.latents, c.tensor("final.latents")) <= TOL
    karras = DPMSolverMultistepScheduler.from_config(model_scheduler_config(SDXL), use_karras_sigmas=True)
    assert run(sdxl, karras)[0] == "dpmpp_2m_karras"


@pytest.mark.parametrize(
    "sched, needle",
    [
        # Karras sigmas exist for DPM-Solver here, not for Euler: refused, not dropped.
        (EulerDiscreteScheduler(use_karras_sigmas=True), "EulerDiscreteScheduler(use_karras_sigmas=True)"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
        (DPMSolverMultistepScheduler(solver_order=3), "solver_order=3"),
        (EulerDiscreteScheduler(timestep_spacing="trailing"), "timestep_spacing='trailing'"),
        (DDIMScheduler(prediction_type="v_prediction"), "prediction_type='v_prediction'"),
        # A config the model was not trained with (diffusers' own defaults: linear betas).
        (DDIMScheduler.from_config({"beta_schedule": "linear"}), "beta_schedule='linear'"),
    ],
)
def test_a_setting_the_server_cannot_honour_is_named(sd15, sched, needle):
    with pytest.raises(ValueError) as e:
        sd15("a cat", num_inference_steps=2, scheduler=sched)
    msg = str(e.value)
    assert needle in msg, msg
    assert SD15 in msg, msg
    key = needle.split("(")[-1].split("=")[0]
    # What the server offers instead, per name of that class.
    assert f"has {key}=" in msg, msg


def test_what_the_server_offers_is_in_the_message(sd15):
    with pytest.raises(ValueError) as e:
        sd15("a cat", num_inference_steps=2, scheduler=DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))
    msg = str(e.value)
    assert "`dpmpp_2m` has algorithm_type='dpmsolver++'" in msg, msg
    assert "`dpmpp_2m_karras` has algorithm_type='dpmsolver++'" in msg, msg
    with pytest.raises(ValueError) as e:
        sd15("a cat", num_inference_steps=2, scheduler=EulerDiscreteScheduler(use_karras_sigmas=True))
    assert "`euler` has use_karras_sigmas=False" in str(e.value)


def test_a_class_the_server_lacks_is_refused(sd15):
    with pytest.raises(ValueError, match="no scheduler for HeunDiscreteScheduler") as e:
        sd15("a cat", num_inference_steps=2, scheduler=HeunDiscreteScheduler())
    assert "DDPMScheduler" in str(e.value)  # the classes it has


def test_numpy_values_and_infinity_compare_as_numbers(sd15):
    sched = DPMSolverMultistepScheduler(solver_order=np.int64(2), lambda_min_clipped=-float("inf"),
                                        beta_start=np.float64(0.00085))
    assert sched.config["beta_start"] == 0.00085
    assert run(sd15, sched)[0] == "dpmpp_2m"
    with pytest.raises(ValueError, match="lambda_min_clipped=-5.1"):
        sd15("a cat", num_inference_steps=2, scheduler=DPMSolverMultistepScheduler(lambda_min_clipped=-5.1))
