//! Long-running jobs of the VMM, each on its own worker thread. Today there
//! is one kind: the migration job ([`migration`]), with its adapters to the
//! migration crate's traits ([`adapters`]).

pub mod adapters;
pub mod migration;
