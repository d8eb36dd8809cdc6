//! Planning and running pipelines.
