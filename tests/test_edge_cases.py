"""Edge cases that get a clear error instead of a silent NaN or clamp."""

import numpy as np
import pytest

from codi_eqx.diffusion import (
    NoiseSchedule,
    check_epsilon_timesteps,
    ddim_timesteps,
)
from codi_eqx.sampling._generate import sampler_timesteps

ZERO_SNR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "num_train_timesteps": 1000, "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing", "prediction_type": "epsilon"}


def test_epsilon_at_zero_terminal_snr_is_an_error():
    schedule = NoiseSchedule.from_config(ZERO_SNR)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    with pytest.raises(ValueError, match="alpha_t = 0"):
        check_epsilon_timesteps(schedule.alphas_cumprod, [999, 500], "epsilon")
    check_epsilon_timesteps(schedule.alphas_cumprod, [999], "v_prediction")  # fine
    check_epsilon_timesteps(schedule.alphas_cumprod, [998, 10], "epsilon")   # fine
    # The sampler refuses the run up front (trailing DDIM starts at 999).
    with pytest.raises(ValueError, match="alpha_t = 0"):
        sampler_timesteps("ddim", 4, schedule, ZERO_SNR)
    ts, _ = sampler_timesteps("ddim", 4, schedule, ZERO_SNR, prediction_type="v_prediction")
    assert ts[0] == 999


def test_ddim_timesteps_that_reach_T_are_an_error():
    config = {"num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}
    assert ddim_timesteps(500, config)[0] == 999
    with pytest.raises(ValueError, match="reach timestep 1000"):
        ddim_timesteps(1000, config)
    assert np.all(ddim_timesteps(1000, {**config, "steps_offset": 0}) < 1000)


def test_training_refuses_epsilon_on_a_zero_snr_schedule(tmp_path):
    import json

    from helpers import make_tiny_pipeline

    from codi_eqx.train import TrainConfig, TrainConfigError, plan

    model = make_tiny_pipeline(tmp_path / "model")
    cfg_file = model / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "rescale_betas_zero_snr": True}))
    data = tmp_path / "data"
    from codi_eqx.toy import shapes

    shapes.write_dataset(data, 2)
    with pytest.raises(TrainConfigError, match="alpha_t = 0"):
        plan(TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data),
                         resolution=64, output_dir=str(tmp_path / "out")))
