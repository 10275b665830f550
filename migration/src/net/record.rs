//! The TLS 1.3 record layer after the handshake, in kTLS form: rustls runs
//! the handshake and hands over the traffic keys and sequence numbers
//! (`dangerous_extract_secrets`, the API meant for kTLS), and the records
//! are sealed and opened here, in place, in the channel's own buffers.
//!
//! The records on the wire are ordinary TLS 1.3 application-data records
//! (RFC 8446 §5.2): header `17 03 03 len`, AEAD over the inner plaintext
//! (data, then the content type byte), nonce = IV xor sequence number,
//! additional data = the header. Compared with rustls' buffered API this
//! saves two copies and one allocation per record on the receive side; a
//! kernel with kTLS could take over the same records unchanged.
//!
//! Key updates are not used (neither side sends one; receiving one fails
//! the connection). Instead each direction stops before the AEAD's
//! confidentiality limit ([`MAX_RECORDS`] full records) with a clear error.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext of one record (RFC 8446: 2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Record header length.
pub const HEADER: usize = 5;
/// AEAD tag length (all TLS 1.3 AEADs).
pub const TAG: usize = 16;
/// Largest record on the wire: header, plaintext, content type, tag, and
/// the padding RFC 8446 allows (up to 2^14 + 256 of ciphertext).
pub const MAX_RECORD: usize = HEADER + MAX_PLAINTEXT + 256;
/// Records one key may protect in one direction: 2^24, the limit rustls
/// applies to AES-GCM (RFC 8446 §5.5 allows 2^24.5 full records), i.e.
/// 256 GiB of data per connection and direction.
pub const MAX_RECORDS: u64 = 1 << 24;

/// TLS content types used here.
pub const APPLICATION_DATA: u8 = 23;
/// Alert content type.
pub const ALERT: u8 = 21;
/// Handshake content type (a post-handshake message: refused).
pub const HANDSHAKE: u8 = 22;

/// Why a record could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The negotiated AEAD is not one this layer knows.
    #[error("unsupported TLS cipher suite for the record layer")]
    UnsupportedSuite,
    /// The key could not be set up.
    #[error("TLS key setup failed")]
    Key,
    /// A record failed authentication (tampered, or not from the peer).
    #[error("a TLS record failed authentication (corrupted or forged)")]
    BadRecord,
    /// A malformed record header or length.
    #[error("malformed TLS record: {0}")]
    Malformed(String),
    /// The confidentiality limit of the key was reached.
    #[error(
        "TLS key used for {MAX_RECORDS} records, its confidentiality limit: use more connections"
    )]
    Exhausted,
}

/// One direction's key, IV and sequence number.
///
/// Invariant: `seq` is the sequence number of the next record; it is never
/// reused (sealing or opening fails once it reaches [`MAX_RECORDS`]).
pub struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("seq", &self.seq).finish()
    }
}

impl Keys {
    /// Keys from rustls' extracted secrets (sequence number, secrets).
    pub fn new(seq: u64, s: ConnectionTrafficSecrets) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Key)?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| RecordError::Key)?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    fn nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= MAX_RECORDS {
            return Err(RecordError::Exhausted);
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seals one record at the end of `out`: on entry `out[start..]` holds
    /// [`HEADER`] free bytes, then the plaintext; on return `out[start..]`
    /// is the whole record (header, ciphertext with the content type, tag).
    pub fn seal(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        content_type: u8,
    ) -> Result<(), RecordError> {
        // On any failure the record is removed again, so that plaintext
        // never stays in a buffer that goes to the wire.
        let r = self.seal_inner(out, start, content_type);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn seal_inner(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        content_type: u8,
    ) -> Result<(), RecordError> {
        let plain = out.len() - start - HEADER;
        if plain > MAX_PLAINTEXT {
            return Err(RecordError::Malformed(format!(
                "record plaintext of {plain} bytes"
            )));
        }
        let nonce = self.nonce()?;
        out.push(content_type);
        let len = (plain + 1 + TAG) as u16;
        let hdr = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        out[start..start + HEADER].copy_from_slice(&hdr);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), &mut out[start + HEADER..])
            .map_err(|_| RecordError::Key)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the record `rec` (header included) in place. Returns the
    /// content type and the plaintext's range inside `rec`.
    pub fn open(&mut self, rec: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), RecordError> {
        let hdr: [u8; HEADER] = rec
            .get(..HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| RecordError::Malformed("short record".into()))?;
        let nonce = self.nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(hdr), &mut rec[HEADER..])
            .map_err(|_| RecordError::BadRecord)?;
        // Strip the zero padding; the last non-zero byte is the type.
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or_else(|| RecordError::Malformed("record without a content type".into()))?;
        if end > MAX_PLAINTEXT {
            return Err(RecordError::Malformed(format!(
                "record plaintext of {end} bytes (record_overflow)"
            )));
        }
        Ok((plain[end], HEADER..HEADER + end))
    }
}

/// The length of the record starting at `hdr` (header included), after
/// checking its header.
pub fn record_len(hdr: &[u8; HEADER]) -> Result<usize, RecordError> {
    if hdr[0] != APPLICATION_DATA || hdr[1] != 3 || hdr[2] != 3 {
        return Err(RecordError::Malformed(format!(
            "unexpected record header {hdr:02x?} after the handshake"
        )));
    }
    let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
    if !(TAG + 1..=MAX_RECORD - HEADER).contains(&len) {
        return Err(RecordError::Malformed(format!("record length {len}")));
    }
    Ok(HEADER + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn pair() -> (Keys, Keys) {
        let mk = || {
            Keys::new(
                7,
                ConnectionTrafficSecrets::Aes256Gcm {
                    key: AeadKey::from([9u8; 32]),
                    iv: Iv::from([3u8; 12]),
                },
            )
        };
        (mk().unwrap(), mk().unwrap())
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let (mut tx, mut rx) = pair();
        let mut rec = vec![0u8; HEADER];
        rec.extend_from_slice(b"ferry migrates");
        tx.seal(&mut rec, 0, APPLICATION_DATA).unwrap();
        assert_eq!(
            record_len(rec[..HEADER].try_into().unwrap()).unwrap(),
            rec.len()
        );
        let mut copy = rec.clone();
        let (ct, r) = rx.open(&mut copy).unwrap();
        assert_eq!(ct, APPLICATION_DATA);
        assert_eq!(&copy[r], b"ferry migrates");
        // The next record uses the next nonce: replaying the first fails.
        assert!(matches!(
            rx.open(&mut rec.clone()),
            Err(RecordError::BadRecord)
        ));
        let (mut tx, mut rx) = pair();
        let mut rec = vec![0u8; HEADER];
        rec.extend_from_slice(b"abc");
        tx.seal(&mut rec, 0, APPLICATION_DATA).unwrap();
        rec[6] ^= 1;
        assert!(matches!(rx.open(&mut rec), Err(RecordError::BadRecord)));
    }

    #[test]
    fn headers_and_limits_are_checked() {
        assert!(record_len(&[22, 3, 3, 0, 40]).is_err());
        assert!(record_len(&[23, 3, 3, 0, 5]).is_err());
        assert!(record_len(&[23, 3, 3, 0xff, 0xff]).is_err());
        let (mut tx, _) = pair();
        tx.seq = MAX_RECORDS;
        let mut rec = vec![0u8; HEADER + 1];
        assert!(matches!(
            tx.seal(&mut rec, 0, APPLICATION_DATA),
            Err(RecordError::Exhausted)
        ));
        assert!(rec.is_empty(), "a failed seal leaves no plaintext behind");
    }
}
