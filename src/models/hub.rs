//! Resolving `--model` values: a local diffusers folder, a single-file checkpoint, or a hub id (`org/name[@revision]`)
//! fetched through `hf-hub` and its cache (`HF_HOME`; `HF_HUB_OFFLINE=1` reads the cache only).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use super::checkpoint::{Checkpoint, CheckpointOptions};
use super::{ModelError, ModelSource, Result};

/// The files a diffusers repo needs, from its `model_index.json`: `(path, required)` for every
/// component it names (`tokenizer_2` and `text_encoder_2` too, for SDXL).
pub fn needed_files(model_index: &serde_json::Value) -> Vec<(String, bool)> {
    let mut files = vec![("model_index.json".to_string(), true)];
    let Some(obj) = model_index.as_object() else {
        return files;
    };
    for (name, entry) in obj {
        // Components are `[library, class]` pairs; `[null, null]` means absent.
        let class = match entry
            .as_array()
            .and_then(|a| a.get(1))
            .and_then(|c| c.as_str())
        {
            Some(c) => c,
            None => continue,
        };
        let per_component: &[(&str, bool)] = if class.ends_with("Tokenizer") {
            &[
                ("vocab.json", true),
                ("merges.txt", true),
                ("tokenizer_config.json", false),
                ("special_tokens_map.json", false),
            ]
        } else if class.starts_with("CLIPTextModel") {
            &[("config.json", true), ("model.safetensors", true)]
        } else if class.ends_with("Scheduler") {
            &[("scheduler_config.json", true)]
        } else if name == "unet" || name == "vae" {
            &[
                ("config.json", true),
                ("diffusion_pytorch_model.safetensors", true),
            ]
        } else {
            continue;
        };
        for (f, required) in per_component {
            files.push((format!("{name}/{f}"), *required));
        }
    }
    files
}

/// A parsed hub model id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`; `None` when `spec` is not of that form.
    pub fn parse(spec: &str) -> Option<HubId> {
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !s.starts_with('.')
        };
        if !ok(org) || !ok(name) {
            return None;
        }
        Some(HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution.
pub fn offline_from_env() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .ok()
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

/// Resolves a `--model` value into its id and files: an existing folder first, then a hub id.
pub fn resolve(spec: &str) -> Result<(String, ModelSource)> {
    resolve_with(spec, &CheckpointOptions::default())
}

/// [`resolve`], with how to read a single-file checkpoint: a `.safetensors` file is one,
/// served under its file stem.
pub fn resolve_with(spec: &str, checkpoint: &CheckpointOptions) -> Result<(String, ModelSource)> {
    let path = Path::new(spec);
    if path.is_file() {
        if super::source::is_pickle(path) {
            return Err(ModelError::Pickle {
                path: spec.to_string(),
            });
        }
        let is_safetensors = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if !is_safetensors {
            return Err(ModelError::NotAModel {
                path: spec.to_string(),
                reason: "--model takes a diffusers folder (with model_index.json), a single-file \
                         `.safetensors` checkpoint, or a hub id (org/name[@revision])"
                    .into(),
            });
        }
        let opened = Checkpoint::open(path, checkpoint)?;
        let id = path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok((id, ModelSource::Checkpoint(std::sync::Arc::new(opened))));
    }
    if path.is_dir() {
        let canonical = path.canonicalize().map_err(|source| ModelError::Io {
            path: spec.to_string(),
            source,
        })?;
        let id = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok((id, ModelSource::Dir(canonical)));
    }
    let hub = HubId::parse(spec).ok_or_else(|| {
        ModelError::Hub(format!(
            "`{spec}` is neither a folder nor a hub id of the form org/name[@revision]"
        ))
    })?;
    let dir = if offline_from_env() {
        resolve_from_cache(&Cache::from_env(), &hub)?
    } else {
        download(&hub)?
    };
    Ok((
        spec.split('@').next().unwrap_or(spec).to_string(),
        ModelSource::Dir(dir),
    ))
}

/// Finds every needed file of `hub` in the local cache and returns the snapshot folder.
pub fn resolve_from_cache(cache: &Cache, hub: &HubId) -> Result<PathBuf> {
    let repo = Repo::with_revision(hub.repo.clone(), RepoType::Model, hub.revision.clone());
    let folder = cache.path().join(repo.folder_name());
    // A revision is either a ref (refs/<name> holds the commit) or a commit hash itself.
    let commit = std::fs::read_to_string(folder.join("refs").join(&hub.revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| hub.revision.clone());
    let snapshot = folder.join("snapshots").join(&commit);
    let not_cached = |file: &str| {
        ModelError::Hub(format!(
            "{}@{} is not fully in the cache at {} (missing {file}); unset HF_HUB_OFFLINE to download it",
            hub.repo,
            hub.revision,
            cache.path().display()
        ))
    };
    let index_bytes = std::fs::read(snapshot.join("model_index.json"))
        .map_err(|_| not_cached("model_index.json"))?;
    let index: serde_json::Value =
        serde_json::from_slice(&index_bytes).map_err(|source| ModelError::Json {
            path: snapshot.join("model_index.json").display().to_string(),
            source,
        })?;
    for (file, required) in needed_files(&index) {
        if required && !snapshot.join(&file).is_file() {
            return Err(not_cached(&file));
        }
    }
    Ok(snapshot)
}

/// Downloads (or finds in the cache) every needed file of `hub` and returns the snapshot folder.
fn download(hub: &HubId) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| ModelError::Hub(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        hub.repo.clone(),
        RepoType::Model,
        hub.revision.clone(),
    ));
    let index_path = repo
        .get("model_index.json")
        .map_err(|e| ModelError::Hub(format!("{}: model_index.json: {e}", hub.repo)))?;
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).map_err(
        |source| ModelError::Io {
            path: index_path.display().to_string(),
            source,
        },
    )?)
    .map_err(|source| ModelError::Json {
        path: index_path.display().to_string(),
        source,
    })?;
    for (file, required) in needed_files(&index) {
        match repo.get(&file) {
            Ok(_) => {}
            Err(e) if required => {
                return Err(ModelError::Hub(format!("{}: {file}: {e}", hub.repo)));
            }
            Err(_) => {}
        }
    }
    index_path
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::Hub(format!("{}: no snapshot folder", hub.repo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_files_follow_model_index_components() {
        let index = serde_json::json!({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": true,
            "feature_extractor": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
        let files = needed_files(&index);
        let required: Vec<&str> = files
            .iter()
            .filter(|(_, r)| *r)
            .map(|(f, _)| f.as_str())
            .collect();
        for f in [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder_2/model.safetensors",
            "tokenizer_2/merges.txt",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
        ] {
            assert!(required.contains(&f), "{f} in {required:?}");
        }
        assert!(!files
            .iter()
            .any(|(f, _)| f.starts_with("feature_extractor")));
    }

    #[test]
    fn hub_ids_parse_with_and_without_revision() {
        assert_eq!(
            HubId::parse("org/name"),
            Some(HubId {
                repo: "org/name".into(),
                revision: "main".into()
            })
        );
        assert_eq!(
            HubId::parse("stabilityai/sd-turbo@fp16").unwrap().revision,
            "fp16"
        );
        for bad in [
            "name",
            "org/",
            "/name",
            "a/b/c",
            "org/name@",
            "../x/y",
            "o rg/n",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }
}
