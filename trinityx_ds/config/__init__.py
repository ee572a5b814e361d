"""Config room: the typed run configuration, its YAML loader and `trinityx config validate`."""
from trinityx_ds.config.load import (cmd_validate, config_from_dict, config_to_dict, load_config, save_config,
                                     validate_file)
from trinityx_ds.config.schema import (ConfigError, DataConfig, DataSource, ExpertsConfig, LoraConfig, ModelConfig,
                                       OutputConfig, ParallelConfig, RouterConfig, RouterLossConfig, RunConfig,
                                       Stage1Config, StageConfig, TrainConfig)

__all__ = ["ConfigError", "DataConfig", "DataSource", "ExpertsConfig", "LoraConfig", "ModelConfig", "OutputConfig",
           "ParallelConfig", "RouterConfig", "RouterLossConfig", "RunConfig", "Stage1Config", "StageConfig", "TrainConfig",
           "cmd_validate", "config_from_dict", "config_to_dict", "load_config", "save_config", "validate_file"]
