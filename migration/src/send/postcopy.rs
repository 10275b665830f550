//! Post-copy on the source: the switch from pre-copy, page requests served
//! ahead of the background push over all data connections, and recovery.

use super::{Ctx, Failed, Phase, Streaming};
use crate::error::MigrationError;
use crate::live::SwitchoverReason;

impl Streaming {
    /// Switches the running pre-copy to post-copy for `reason`.
    pub(super) fn postcopy(
        self: Box<Self>,
        _ctx: &Ctx,
        reason: SwitchoverReason,
    ) -> Result<Phase, Failed> {
        Err(Failed {
            err: MigrationError::InvalidParams(format!(
                "post-copy ({reason:?}) is not implemented yet"
            )),
            phase: Phase::Streaming(self),
        })
    }
}
