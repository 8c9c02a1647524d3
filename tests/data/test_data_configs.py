"""Every data config is a data module as it is: its description keys (schedule endpoints,
sigma_data, FID features) are constructor arguments, read back from the module."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffexp.build.factory import build_datamodule
from diffexp.data import DataDescription, DescribedDataModule
from tests.helpers import conf_options

DATA_OPTIONS = conf_options("data")


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_every_data_node_is_instantiated_as_it_is(compose, option, tmp_path):
    absent = tmp_path / "absent"  # MNIST and CIFAR-10: construction reads no files
    cfg = compose([f"data={option}", f"paths.data_dir={absent}"])
    node = OmegaConf.to_container(cfg.data, resolve=True)
    assert {"log_snr_max", "log_snr_min", "sigma_data"} <= set(node), option
    dm = instantiate(cfg.data)
    assert isinstance(dm, DescribedDataModule)
    for key in DataDescription.keys():
        assert getattr(dm.description, key) == node.get(key), (option, key)
        assert getattr(dm.description, key) == node.get(key), (option, key)
    assert not absent.exists()
    # the factory builds the same module, description included
    assert build_datamodule(cfg.data).description == dm.description


def test_description_overrides_reach_the_module_and_the_schedule(compose):
    cfg = compose(["data=digits", "data.log_snr_max=8", "data.fid_features=inception"])
    dm = build_datamodule(cfg.data)
    assert (
        dm.description.log_snr_max,
        dm.description.log_snr_min,
        dm.description.fid_features,
    ) == (8, -5.0, "inception")
    assert instantiate(cfg.schedule).endpoints[0] == 8
