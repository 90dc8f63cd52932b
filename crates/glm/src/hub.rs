//! Where a model comes from: a local directory, or a Hugging Face Hub id resolved through the standard
//! cache (`HF_HOME`, default `~/.cache/huggingface`), downloading only when `HF_HUB_OFFLINE` is not set.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{GlmError, Result};

/// Files a model directory needs besides its weights.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files used when present.
const OPTIONAL_FILES: [&str; 4] = [
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Resolves `model` (a directory, or a hub id like `zai-org/glm-4-9b-chat-hf`) to a local directory
/// holding config.json, the tokenizer and the safetensors checkpoint.
pub fn resolve_model(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(model) {
        return Err(GlmError::Input(format!(
            "{model} is not a directory and not a hub id (owner/name): point --model at a model directory"
        )));
    }
    let revision = revision.unwrap_or("main");
    let resolved = if offline() {
        cached_snapshot(&Cache::from_env(), model, revision)
    } else {
        download(model, revision)
    };
    // `org/name` may also have been meant as a relative path with a typo: say that too.
    resolved.map_err(|e| match e {
        GlmError::Input(message) => GlmError::Input(format!(
            "{message}; no local directory {model} exists either"
        )),
        e => e,
    })
}

fn looks_like_repo_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// `HF_HUB_OFFLINE=1` (or true/yes/on), as huggingface_hub reads it.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The snapshot folder of `repo_id` at `revision` in the cache, complete enough to load.
pub fn cached_snapshot(cache: &Cache, repo_id: &str, revision: &str) -> Result<PathBuf> {
    let repo_dir = cache
        .path()
        .join(Repo::new(repo_id.to_string(), RepoType::Model).folder_name());
    let not_cached = |what: String| {
        GlmError::Input(format!(
            "{repo_id} (revision {revision}) is not in the Hugging Face cache at {} ({what}) and \
             HF_HUB_OFFLINE is set: download it once with network access, or unset HF_HUB_OFFLINE",
            cache.path().display()
        ))
    };
    // A branch or tag is a file under refs/ naming the commit; a commit hash names the snapshot itself.
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(hash) => hash.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => return Err(not_cached(format!("no refs/{revision}"))),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    for file in REQUIRED_FILES {
        if !snapshot.join(file).is_file() {
            return Err(not_cached(format!("snapshot {commit} lacks {file}")));
        }
    }
    if !snapshot.join(SINGLE_FILE).is_file() && !snapshot.join(INDEX_FILE).is_file() {
        return Err(not_cached(format!(
            "snapshot {commit} has no safetensors checkpoint"
        )));
    }
    Ok(snapshot)
}

/// Downloads what a model needs into the cache (files already there are not fetched again).
fn download(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let hub_error = |file: &str, e: hf_hub::api::sync::ApiError| {
        GlmError::Input(format!(
            "cannot download {file} of {repo_id} (revision {revision}): {e}; check the id and the \
             network, or set HF_HUB_OFFLINE=1 to use the cache only"
        ))
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error("anything", e))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let [config_file, tokenizer_file] = REQUIRED_FILES;
    let config = repo
        .get(config_file)
        .map_err(|e| hub_error(config_file, e))?;
    repo.get(tokenizer_file)
        .map_err(|e| hub_error(tokenizer_file, e))?;
    for file in OPTIONAL_FILES {
        // Absent optional files are normal; anything they would have said has a default.
        let _ = repo.get(file);
    }
    match repo.get(INDEX_FILE) {
        Ok(index) => {
            for shard in shard_files(&index)? {
                repo.get(&shard).map_err(|e| hub_error(&shard, e))?;
            }
        }
        Err(_) => {
            repo.get(SINGLE_FILE)
                .map_err(|e| hub_error(SINGLE_FILE, e))?;
        }
    }
    Ok(config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

/// The shard file names an index's weight_map points to, each once.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| GlmError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| GlmError::Json {
            path: index.to_path_buf(),
            source,
        })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| GlmError::Config {
            path: index.to_path_buf(),
            message: "no weight_map object".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}
