//! The served models by name, and where each stands: loading, ready, or failed.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::config::{ModelConfig, ModelDefaults};
use crate::engine::{Engine, LoadError};

/// A ready model and its request defaults.
#[derive(Clone)]
pub struct ModelHandle {
    /// The engine to submit to.
    pub engine: Arc<Engine>,
    /// Defaults that fill what a request leaves out.
    pub defaults: Arc<ModelDefaults>,
}

/// Why a model name cannot be served right now.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    /// No model of that name is configured.
    #[error("model `{0}` does not exist")]
    Unknown(String),
    /// It is configured but still loading.
    #[error("model `{0}` is still loading; retry shortly")]
    Loading(String),
    /// It failed to load.
    #[error("model `{name}` failed to load: {reason}")]
    Failed {
        /// The model.
        name: String,
        /// The load error.
        reason: String,
    },
}

enum State {
    Loading,
    Ready(Arc<Engine>),
    Failed(String),
}

struct Entry {
    config: ModelConfig,
    defaults: Arc<ModelDefaults>,
    state: RwLock<State>,
}

/// All configured models.
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// Registers the models as loading.
    pub fn new(models: Vec<ModelConfig>) -> Self {
        let entries = models
            .into_iter()
            .map(|config| {
                let name = config.engine.name.clone();
                let entry = Entry {
                    defaults: Arc::new(config.defaults.clone()),
                    config,
                    state: RwLock::new(State::Loading),
                };
                (name, entry)
            })
            .collect();
        Self { entries }
    }

    /// Model names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// True once every model is loaded.
    pub fn all_ready(&self) -> bool {
        self.entries
            .values()
            .all(|e| matches!(e.state.read().as_deref(), Ok(State::Ready(_))))
    }

    /// The ready model of this name.
    pub fn get(&self, name: &str) -> Result<ModelHandle, LookupError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| LookupError::Unknown(name.to_owned()))?;
        let state = entry
            .state
            .read()
            .map_err(|_| LookupError::Loading(name.to_owned()))?;
        match &*state {
            State::Ready(engine) => Ok(ModelHandle {
                engine: Arc::clone(engine),
                defaults: Arc::clone(&entry.defaults),
            }),
            State::Loading => Err(LookupError::Loading(name.to_owned())),
            State::Failed(reason) => Err(LookupError::Failed {
                name: name.to_owned(),
                reason: reason.clone(),
            }),
        }
    }

    /// Loads every model, one after another; stops at the first failure.
    pub async fn load_all(&self) -> Result<(), (String, LoadError)> {
        for (name, entry) in &self.entries {
            let loaded = Engine::load(entry.config.engine.clone()).await;
            let (state, result) = match loaded {
                Ok(engine) => (State::Ready(Arc::new(engine)), Ok(())),
                Err(e) => (State::Failed(e.to_string()), Err((name.clone(), e))),
            };
            if let Ok(mut s) = entry.state.write() {
                *s = state;
            }
            result?;
        }
        Ok(())
    }

    /// Stops every engine, letting each finish its work. Blocks.
    pub fn shutdown(&self) {
        for entry in self.entries.values() {
            let engine = match entry.state.write() {
                Ok(mut s) => match std::mem::replace(&mut *s, State::Failed("shut down".into())) {
                    State::Ready(engine) => Some(engine),
                    _ => None,
                },
                Err(_) => None,
            };
            if let Some(engine) = engine {
                engine.shutdown();
            }
        }
    }
}
