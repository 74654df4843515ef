//! Model loading and the networks themselves: diffusers folders (local or from the hub),
//! single-file checkpoints in the original layout,
//! config-driven CLIP text encoder, UNet and VAE, and the CLIP tokenizer.

pub mod checkpoint;
pub mod clip;
pub mod embedded;
pub mod hub;
pub mod lora;
pub mod pipeline_model;
pub mod source;
pub mod synthetic;
pub mod taesd;
pub(crate) mod tensor_file;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use source::ModelSource;

/// Everything that can go wrong while finding, reading or building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model needs is not there.
    #[error("{source_desc}: missing file `{path}`")]
    MissingFile {
        /// Which model source was searched (folder path or embedded name).
        source_desc: String,
        /// The path inside the model, e.g. `unet/config.json`.
        path: String,
    },
    /// Reading a file failed.
    #[error("reading `{path}`: {source}")]
    Io {
        /// The file that could not be read.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed into the expected shape.
    #[error("parsing `{path}`: {source}")]
    Json {
        /// The file that failed to parse.
        path: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A config holds a value this implementation does not support.
    #[error("unsupported config in `{path}`: {reason}")]
    Unsupported {
        /// The config file.
        path: String,
        /// What is unsupported and why.
        reason: String,
    },
    /// A weight file is a Python pickle (`.ckpt`, `.bin`, `.pt`, `.pth`): loading one can run
    /// arbitrary code, so it is refused.
    #[error(
        "`{path}` is a Python pickle: loading one can run arbitrary code, so stepstream refuses \
         it; use the model's `.safetensors` weights (most model pages publish them), or convert \
         the file once in a sandbox you trust"
    )]
    Pickle {
        /// The refused file.
        path: String,
    },
    /// A `--model` path is a file of a kind that is not a model.
    #[error("`{path}`: {reason}")]
    NotAModel {
        /// The file.
        path: String,
        /// What it is and what is expected instead.
        reason: String,
    },
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Resolving a hub model id failed.
    #[error("hub: {0}")]
    Hub(String),
    /// A LoRA could not be read or does not fit its model (boxed: it is large and rare).
    #[error(transparent)]
    Lora(Box<lora::LoraError>),
    /// A tensor operation failed (wrong weight shapes, missing weights, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<lora::LoraError> for ModelError {
    fn from(e: lora::LoraError) -> Self {
        ModelError::Lora(Box::new(e))
    }
}

/// Result alias for model code.
pub type Result<T> = std::result::Result<T, ModelError>;
