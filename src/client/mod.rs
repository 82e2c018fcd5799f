//! The CLI verbs that talk to a running server over its Ollama API, as Ollama's own CLI does:
//! `run`, `list`, `ps`, `show`, `pull`, `rm`, `cp`, `stop`.

mod commands;
mod drill;
pub(crate) mod format;
pub(crate) mod http;
mod modelfile;
mod run;

pub use commands::{cp, create, list, ps, pull, rm, show, stop};
pub use drill::drill;
pub use http::ClientError;
pub use run::run;
