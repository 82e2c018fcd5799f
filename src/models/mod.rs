//! The models: their names, the on-disk store (Ollama's layout), GGUF headers, and the
//! registry that loads and unloads them on demand.

pub mod gguf;
pub mod name;
mod params;
pub mod pull;
mod registry;
pub mod store;

pub use gguf::GgufHeader;
pub use name::{ModelName, NameError};
pub use params::Parameters;
pub use pull::{HubConfig, PullError, PullEvent, PullSpec};
pub use registry::{Lease, Listed, Loaded, LookupError, ModelSpec, Models, Origin};
pub use store::{Digest, ModelCheck, NewModel, Store, StoreError, StoredModel};
