//! The error type of a migration, on both sides.

use crate::traits::BackendError;

/// Errors of a migration. The display text is what the API reports, so every
/// variant names its cause (the peer's message, the device id, the step).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Kept for API compatibility; no code path returns it any more.
    #[error("migration is not implemented")]
    Unsupported,
    /// The parameters were refused before anything started.
    #[error("invalid migration parameters: {0}")]
    InvalidParams(String),
    /// The migration was cancelled.
    #[error("migration cancelled")]
    Cancelled,
    /// A socket or file operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TLS setup or authentication failed: a certificate file could not be
    /// used, or a peer was refused (or refused us). The text says who
    /// refused whom and why.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer sent something that violates the protocol (hostile or broken
    /// input). Nothing of it was applied.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The destination refused or failed the migration; the text is its own.
    #[error("destination reported an error: {0}")]
    Remote(String),
    /// The source aborted the migration; the text is its own.
    #[error("source aborted the migration: {0}")]
    PeerAborted(String),
    /// The peer closed a connection before the migration finished.
    #[error("peer closed the connection: {0}")]
    PeerClosed(String),
    /// A VM backend call failed; `context` names the call.
    #[error("{context}: {source}")]
    Vm {
        /// The backend call.
        context: String,
        /// The backend's message.
        #[source]
        source: BackendError,
    },
    /// A device failed; `id` is the device's id.
    #[error("device {id}: {msg}")]
    Device {
        /// Device id.
        id: String,
        /// What failed.
        msg: String,
    },
    /// The overall timeout (`timeout_s`) or a setup timeout expired.
    #[error("timed out: {0}")]
    Timeout(String),
    /// `progress_timeout_s` passed without progress; the migration was
    /// cancelled and the source runs on.
    #[error("{0}")]
    NoProgress(String),
    /// No progress on a connection for the stall timeout.
    #[error("stalled: {0}")]
    Stalled(String),
    /// The destination's VM does not match the source's.
    #[error("incompatible configuration: {0}")]
    Incompatible(String),
    /// Source only: the switch-over was committed (COMMIT written to the
    /// destination) but the destination's RESUMED never arrived (`cause`:
    /// connection broken, destination error, or no reply within the stall
    /// timeout). The destination may or may not be running the guest, so the
    /// source VM was **left paused** (devices STOP, dirty logging off) to
    /// make sure the guest never runs twice. The caller must keep the paused
    /// VM (not exit with success); resuming it is a manual decision for when
    /// the destination is known not to run the guest.
    #[error(
        "migration outcome uncertain: the switch-over was committed but the destination did not confirm \
         that the VM started ({cause}); the VM was left paused on the source to avoid running it twice \
         (resume it by hand only if the destination did not start it)"
    )]
    CommitUncertain {
        /// Why the confirmation is missing.
        #[source]
        cause: Box<MigrationError>,
    },
    /// Source only: post-copy was running (the guest runs on the
    /// destination, which still lacks some of its pages) when `cause`
    /// stopped it. The source VM stays paused for good and keeps its memory:
    /// the faulting vCPUs on the destination wait, and a new send with
    /// `"resume": true` reconnects and finishes the post-copy.
    #[error(
        "post-copy interrupted ({cause}): the guest runs on the destination and waits for its \
         missing pages; this VM stays paused and keeps them: send again with \"resume\": true"
    )]
    PostcopyPaused {
        /// What stopped the post-copy.
        #[source]
        cause: Box<MigrationError>,
    },
    /// A broken invariant inside the migration machinery (a worker thread
    /// that panicked, a frame built inconsistently): never caused by the
    /// peer's input. The text names what broke.
    #[error("internal error: {0}")]
    Internal(String),
    /// A worker stopped because another part of the migration failed first;
    /// never the final error of a migration (the first cause replaces it).
    #[error("aborted after an earlier failure")]
    Aborted,
}

impl MigrationError {
    /// Builds an [`MigrationError::Io`] with a context.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if let Some(t) = source
            .get_ref()
            .and_then(|i| i.downcast_ref::<crate::net::TlsError>())
        {
            return MigrationError::Tls(format!("{t} ({})", context.into()));
        }
        MigrationError::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds a [`MigrationError::Vm`] with a context.
    pub(crate) fn vm(context: impl Into<String>, source: BackendError) -> Self {
        MigrationError::Vm {
            context: context.into(),
            source,
        }
    }

    /// Builds a [`MigrationError::Device`].
    pub(crate) fn device(id: &str, msg: impl Into<String>) -> Self {
        MigrationError::Device {
            id: id.to_string(),
            msg: msg.into(),
        }
    }

    /// Whether the source VM was left paused because the outcome of a
    /// committed switch-over is unknown ([`MigrationError::CommitUncertain`]).
    pub fn is_commit_uncertain(&self) -> bool {
        matches!(self, MigrationError::CommitUncertain { .. })
    }

    /// Whether the source VM was left paused for good by this failure
    /// (commit uncertain, or post-copy interrupted): it must not be resumed
    /// automatically.
    pub fn keeps_vm_paused(&self) -> bool {
        matches!(
            self,
            MigrationError::CommitUncertain { .. } | MigrationError::PostcopyPaused { .. }
        )
    }

    /// Builds a [`MigrationError::Protocol`].
    pub(crate) fn proto(msg: impl Into<String>) -> Self {
        MigrationError::Protocol(msg.into())
    }
}
