//! Resolving `--model` values: a local diffusers folder, a single-file checkpoint, or a hub id (`org/name[@revision]`)
//! fetched through `hf-hub` and its cache (`HF_HOME`; `HF_HUB_OFFLINE=1` reads the cache only).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use super::checkpoint::{Checkpoint, CheckpointOptions};
use super::{ModelError, ModelSource, Result};

/// One file a model needs: the names it may have, in the order tried, and whether it must exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// Paths inside the repo, preferred first (a weight: its variant files, then the others).
    pub names: Vec<String>,
    /// Whether the model cannot load without it.
    pub required: bool,
}

/// How to resolve a `--model` value.
#[derive(Clone, Debug, Default)]
pub struct ResolveOptions {
    /// For single-file checkpoints.
    pub checkpoint: CheckpointOptions,
    /// The weight variant to prefer (`fp16`); `None`: the smallest that fits `half`.
    pub variant: Option<String>,
    /// Whether the compute dtype is f16/bf16 (then the `fp16` files are the ones to fetch).
    pub half: bool,
}

impl ResolveOptions {
    fn dtype(&self) -> candle_core::DType {
        if self.half {
            candle_core::DType::F16
        } else {
            candle_core::DType::F32
        }
    }
}

/// The files a diffusers repo needs, from its `model_index.json`, for every component it names
/// (`tokenizer_2` and `text_encoder_2` too, for SDXL): only safetensors weights, one file per
/// component, `variant`'s (or, without one, the smallest that fits `dtype`) tried first.
pub fn needed_files(
    model_index: &serde_json::Value,
    variant: Option<&str>,
    dtype: candle_core::DType,
) -> Vec<Needed> {
    let one = |name: String, required| Needed {
        names: vec![name],
        required,
    };
    let mut files = vec![one("model_index.json".to_string(), true)];
    let weights = super::source::weight_files(variant, dtype);
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
        let (per_component, stem): (&[(&str, bool)], Option<&str>) = if class.ends_with("Tokenizer")
        {
            (
                &[
                    ("vocab.json", true),
                    ("merges.txt", true),
                    ("tokenizer_config.json", false),
                    ("special_tokens_map.json", false),
                ],
                None,
            )
        } else if class.starts_with("CLIPTextModel") {
            (&[("config.json", true)], Some("model."))
        } else if class.ends_with("Scheduler") {
            (&[("scheduler_config.json", true)], None)
        } else if name == "unet" || name == "vae" {
            (&[("config.json", true)], Some("diffusion_pytorch_model."))
        } else {
            continue;
        };
        for (f, required) in per_component {
            files.push(one(format!("{name}/{f}"), *required));
        }
        if let Some(stem) = stem {
            files.push(Needed {
                names: weights
                    .iter()
                    .filter(|w| w.starts_with(stem))
                    .map(|w| format!("{name}/{w}"))
                    .collect(),
                required: true,
            });
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
    resolve_with(spec, &ResolveOptions::default())
}

/// [`resolve`], with how to read a single-file checkpoint: a `.safetensors` file is one,
/// served under its file stem.
pub fn resolve_with(spec: &str, options: &ResolveOptions) -> Result<(String, ModelSource)> {
    let (id, source) = resolve_source(spec, options)?;
    Ok(match &options.variant {
        Some(v) if !matches!(source, ModelSource::Checkpoint(_)) => (
            id,
            ModelSource::Variant {
                variant: v.clone(),
                inner: Box::new(source),
            },
        ),
        _ => (id, source),
    })
}

fn resolve_source(spec: &str, options: &ResolveOptions) -> Result<(String, ModelSource)> {
    let checkpoint = &options.checkpoint;
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
        resolve_from_cache_with(&Cache::from_env(), &hub, options)?
    } else {
        download(&hub, options)?
    };
    Ok((
        spec.split('@').next().unwrap_or(spec).to_string(),
        ModelSource::Dir(dir),
    ))
}

/// Finds every needed file of `hub` in the local cache and returns the snapshot folder.
pub fn resolve_from_cache(cache: &Cache, hub: &HubId) -> Result<PathBuf> {
    resolve_from_cache_with(cache, hub, &ResolveOptions::default())
}

/// [`resolve_from_cache`] for a variant and dtype: any of a weight's names will do.
pub fn resolve_from_cache_with(
    cache: &Cache,
    hub: &HubId,
    options: &ResolveOptions,
) -> Result<PathBuf> {
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
    for need in needed_files(&index, options.variant.as_deref(), options.dtype()) {
        if need.required && !need.names.iter().any(|f| snapshot.join(f).is_file()) {
            return Err(not_cached(&need.names.join(" or ")));
        }
    }
    Ok(snapshot)
}

/// Downloads (or finds in the cache) every needed file of `hub` and returns the snapshot folder.
fn download(hub: &HubId, options: &ResolveOptions) -> Result<PathBuf> {
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
    // One file per need: the first of its names the repo has (a weight's preferred variant
    // first), so a repo's other variants and its pickles are never fetched.
    for need in needed_files(&index, options.variant.as_deref(), options.dtype()) {
        let mut last = None;
        let found = need.names.iter().any(|file| match repo.get(file) {
            Ok(_) => true,
            Err(e) => {
                last = Some(format!("{file}: {e}"));
                false
            }
        });
        if !found && need.required {
            return Err(ModelError::Hub(format!(
                "{}: none of {} ({})",
                hub.repo,
                need.names.join(", "),
                last.unwrap_or_default()
            )));
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
        let files = needed_files(&index, None, candle_core::DType::F32);
        let required: Vec<&str> = files
            .iter()
            .filter(|n| n.required)
            .map(|n| n.names[0].as_str())
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
            .any(|n| n.names[0].starts_with("feature_extractor")));
        // Only safetensors, never a pickle; half precision fetches the fp16 files first.
        assert!(files
            .iter()
            .flat_map(|n| &n.names)
            .all(|f| f.ends_with(".json") || f.ends_with(".txt") || f.ends_with(".safetensors")));
        let half = needed_files(&index, None, candle_core::DType::F16);
        let unet = half
            .iter()
            .find(|n| n.names[0].starts_with("unet/diffusion"))
            .unwrap();
        assert_eq!(
            unet.names,
            [
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "unet/diffusion_pytorch_model.safetensors"
            ]
        );
        let te = needed_files(&index, Some("fp16"), candle_core::DType::F32);
        assert!(te.iter().any(|n| n.names
            == [
                "text_encoder_2/model.fp16.safetensors",
                "text_encoder_2/model.safetensors"
            ]));
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
