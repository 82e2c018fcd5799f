//! The cloud-first router: requests for models a cloud upstream serves go there first, and
//! fall over to the local model when the cloud is down, slow or refusing.

// Wired by the router (the `/v1/messages` endpoint and the Anthropic upstream); until then
// only its tests use it.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod anthropic;
