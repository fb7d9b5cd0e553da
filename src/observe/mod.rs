//! Observability: request ids now; access logs and metrics join here.

pub mod request_id;
