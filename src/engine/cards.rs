//! Pieces of a model's ListModels card built from lower layers' plain data.

use crate::proto;
use crate::schedulers::{self, SchedulerConfig};

/// `ModelInfo.scheduler_info` for a model whose scheduler config is `config`: every scheduler
/// name with its diffusers class and effective config as JSON text.
pub(super) fn scheduler_info(config: &SchedulerConfig) -> Vec<proto::SchedulerInfo> {
    schedulers::scheduler_infos(config)
        .into_iter()
        .map(|s| proto::SchedulerInfo {
            name: s.name.into(),
            diffusers_class: s.diffusers_class.into(),
            config_json: s.config.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_parseable_entry_per_scheduler_name() {
        let info = scheduler_info(&SchedulerConfig::default());
        let names: Vec<&str> = info.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, schedulers::SCHEDULER_NAMES);
        for s in &info {
            let v: serde_json::Value = serde_json::from_str(&s.config_json).unwrap();
            assert!(v.is_object(), "{}", s.name);
            assert!(schedulers::name_for_class(&s.diffusers_class).is_some());
        }
        let karras = info.iter().find(|s| s.name == "dpmpp_2m_karras").unwrap();
        assert_eq!(karras.diffusers_class, "DPMSolverMultistepScheduler");
        assert!(karras.config_json.contains(r#""use_karras_sigmas":true"#));
    }
}
