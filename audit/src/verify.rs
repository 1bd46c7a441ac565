//! Verification: walks each chain in sequence order and names the first record that breaks it.
//!
//! What breaks a chain:
//! - a changed record: its seal no longer matches its body, position and predecessor;
//! - a deleted record: a gap in the sequence;
//! - an inserted or reordered record: a seal or a link to the predecessor that does not hold;
//! - pruning nobody recorded: an anchor without the checkpoint record that the writer appends
//!   before it prunes;
//! - a rewrite of the chain's tail, or its truncation: only against a head kept elsewhere
//!   (`--head CHAIN:SEQ:HASH`), because whoever can write the database can also recompute every
//!   seal after the point they changed. Keep the heads `verify` prints (or the gateway's metrics)
//!   outside the database.

use std::collections::BTreeMap;

use crate::record::{GENESIS, Index, Record, parse_body, seal_raw};
use crate::store::{Head, Store, StoreError};

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The seal does not match.
    #[error(
        "record was altered: its content hashes to {computed}, but the stored hash is {stored}"
    )]
    Altered {
        /// The seal of what is stored.
        computed: String,
        /// The hash stored with it.
        stored: String,
    },
    /// Records are missing before this one.
    #[error("record is missing: the chain goes from {before} to {found}")]
    Missing {
        /// The last record before the gap.
        before: u64,
        /// The next record present.
        found: u64,
    },
    /// The record does not link to its predecessor.
    #[error(
        "record does not follow its predecessor: it names {named} as predecessor, but the record before it hashes to {actual}; a record was inserted, removed or moved here"
    )]
    Unlinked {
        /// The predecessor hash the record carries.
        named: String,
        /// The predecessor's actual hash.
        actual: String,
    },
    /// A sequence number appears out of order.
    #[error("record is out of order: expected {expected}")]
    OutOfOrder {
        /// The sequence number expected here.
        expected: u64,
    },
    /// Records were removed without a checkpoint recording it.
    #[error(
        "records up to {through} are gone and no checkpoint in the chain records their pruning"
    )]
    UnrecordedPrune {
        /// The anchor's sequence number.
        through: u64,
    },
    /// The body cannot be read.
    #[error("record body cannot be read: {0}")]
    Body(String),
    /// The index columns do not match the body (`--deep`).
    #[error("record's index columns do not match its body: {0}")]
    Index(String),
    /// The record differs from a head kept elsewhere.
    #[error("record differs from the expected head: expected hash {expected}, found {found}")]
    HeadMismatch {
        /// The hash kept elsewhere.
        expected: String,
        /// The hash stored.
        found: String,
    },
    /// The chain ends before a head kept elsewhere.
    #[error("chain ends at {last}: records up to the expected head are missing (truncated)")]
    Truncated {
        /// The last record present.
        last: u64,
    },
}

/// The first record that breaks a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chain {chain:?}, record {seq}: {fault}")]
pub struct Broken {
    /// The chain.
    pub chain: String,
    /// The record.
    pub seq: u64,
    /// What is wrong.
    pub fault: Fault,
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// The chain.
    pub chain: String,
    /// Records checked.
    pub records: u64,
    /// The anchor left by pruning, if any.
    pub anchor: Option<Head>,
    /// The last record; keep it outside the database to detect rewrites and truncation later.
    pub head: Option<Head>,
}

/// Verification could not finish or found a break.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A record breaks the chain.
    #[error(transparent)]
    Broken(#[from] Broken),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A record as verification without `--deep` needs it: its position, its links, and the seal
/// computed from what is stored. A store computes it while reading ([`Store::sealed`]), so the
/// bodies need not be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Sequence number.
    pub seq: u64,
    /// The predecessor's hash, as stored.
    pub prev: StoredHash,
    /// The record's hash, as stored.
    pub hash: StoredHash,
    /// The seal of what is stored (body, position, predecessor), lowercase hex.
    pub computed: [u8; 64],
    /// The body of a checkpoint record: the verifier reads the anchor it confirms.
    pub checkpoint: Option<String>,
}

impl Sealed {
    /// From the columns of a record of `chain` as stored, read as bytes: text that is not
    /// UTF-8 fails as altered instead of stopping verification.
    pub fn of_stored(
        chain: &str,
        seq: u64,
        prev: &[u8],
        hash: &[u8],
        event: &[u8],
        body: &[u8],
    ) -> Self {
        let mut computed = [0u8; 64];
        hex::encode_to_slice(seal_raw(chain, seq, prev, body), &mut computed)
            .expect("64 hex digits");
        Self {
            seq,
            prev: StoredHash::of(prev),
            hash: StoredHash::of(hash),
            computed,
            checkpoint: (event == b"checkpoint").then(|| text(body)),
        }
    }

    /// From a record read back, as a record of `chain`.
    pub fn of(chain: &str, record: &Record) -> Self {
        Self::of_stored(
            chain,
            record.seq,
            record.prev.as_bytes(),
            record.hash.as_bytes(),
            record.index.event.as_bytes(),
            record.body.as_bytes(),
        )
    }
}

/// A hash column as stored. Every hash Tollgate writes is 64 hex digits, kept inline, so a page
/// of [`Sealed`] records allocates nothing per record (glibc's malloc and free were about 6% of
/// `audit verify`); anything else, such as an altered column, is kept as text to be named in the
/// fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredHash {
    /// 64 ASCII bytes.
    Digits([u8; 64]),
    /// Any other text.
    Other(String),
}

impl StoredHash {
    /// From a column's bytes as stored.
    pub fn of(bytes: &[u8]) -> Self {
        match <[u8; 64]>::try_from(bytes) {
            Ok(digits) if digits.is_ascii() => Self::Digits(digits),
            _ => Self::Other(text(bytes)),
        }
    }

    /// The column as text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Digits(digits) => std::str::from_utf8(digits).expect("ASCII is UTF-8"),
            Self::Other(text) => text,
        }
    }
}

/// Stored text as a string; bytes that are not UTF-8 become U+FFFD (and then match no hash).
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// [`Sealed::of`] for every record, computed on every core.
pub fn seal_all(chain: &str, records: &[Record]) -> Vec<Sealed> {
    on_every_core(records, |r| Sealed::of(chain, r))
}

/// `f` of every item, in order, computed on every core when there are enough items.
fn on_every_core<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || items.len() < 1024 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a verification thread panicked"))
            .collect()
    })
}

/// One record, as the verifier checks it.
struct Link<'a> {
    seq: u64,
    prev: &'a str,
    hash: &'a str,
    computed: &'a [u8; 64],
    /// The body, when it is to be read: for checkpoints, and for every record when deep.
    body: Option<&'a str>,
    /// The index columns, when deep.
    index: Option<&'a Index>,
}

/// Checks one chain's records, fed in sequence order.
#[derive(Debug)]
pub struct ChainVerifier {
    chain: String,
    anchor: Option<Head>,
    anchor_confirmed: bool,
    next: u64,
    prev: String,
    records: u64,
    deep: bool,
    expected: Option<Head>,
}

impl ChainVerifier {
    /// A verifier for `chain`, which starts after `anchor` (or at the genesis). `deep` also
    /// parses every body and checks the index columns against it. `expected` is a head kept
    /// elsewhere that the chain must still contain.
    pub fn new(chain: &str, anchor: Option<Head>, deep: bool, expected: Option<Head>) -> Self {
        let (next, prev) = match &anchor {
            Some(a) => (a.seq + 1, a.hash.clone()),
            None => (1, GENESIS.to_owned()),
        };
        Self {
            chain: chain.to_owned(),
            anchor_confirmed: anchor.is_none(),
            anchor,
            next,
            prev,
            records: 0,
            deep,
            expected,
        }
    }

    fn broken(&self, seq: u64, fault: Fault) -> Broken {
        Broken {
            chain: self.chain.clone(),
            seq,
            fault,
        }
    }

    /// Checks the next record.
    pub fn push(&mut self, record: &Record) -> Result<(), Broken> {
        self.push_computed(record, &computed_seal(&self.chain, record))
    }

    /// Checks the next record, its seal computed already.
    ///
    /// # Panics
    ///
    /// On a deep verifier: it compares the index columns with the body, which [`Sealed`] leaves
    /// out, so it must be fed whole records ([`ChainVerifier::push`]).
    pub fn push_sealed(&mut self, sealed: &Sealed) -> Result<(), Broken> {
        assert!(!self.deep, "a deep verifier needs whole records");
        self.check(Link {
            seq: sealed.seq,
            prev: sealed.prev.as_str(),
            hash: sealed.hash.as_str(),
            computed: &sealed.computed,
            body: sealed.checkpoint.as_deref(),
            index: None,
        })
    }

    fn push_computed(&mut self, record: &Record, computed: &[u8; 64]) -> Result<(), Broken> {
        let read_body = self.deep || record.index.event == "checkpoint";
        self.check(Link {
            seq: record.seq,
            prev: &record.prev,
            hash: &record.hash,
            computed,
            body: read_body.then_some(record.body.as_str()),
            index: self.deep.then_some(&record.index),
        })
    }

    /// Checks the next records. Their seals are computed on every core (each seal depends only
    /// on its own record); the links are then checked in order.
    pub fn push_all(&mut self, records: &[Record]) -> Result<(), Broken> {
        let chain = self.chain.as_str();
        let seals = on_every_core(records, |r| computed_seal(chain, r));
        for (record, seal) in records.iter().zip(&seals) {
            self.push_computed(record, seal)?;
        }
        Ok(())
    }

    fn check(&mut self, record: Link<'_>) -> Result<(), Broken> {
        if record.seq != self.next {
            let fault = if record.seq > self.next {
                Fault::Missing {
                    before: self.next - 1,
                    found: record.seq,
                }
            } else {
                Fault::OutOfOrder {
                    expected: self.next,
                }
            };
            return Err(self.broken(self.next.min(record.seq), fault));
        }
        if record.computed != record.hash.as_bytes() {
            return Err(self.broken(
                record.seq,
                Fault::Altered {
                    computed: String::from_utf8_lossy(record.computed).into_owned(),
                    stored: record.hash.to_owned(),
                },
            ));
        }
        if record.prev != self.prev {
            return Err(self.broken(
                record.seq,
                Fault::Unlinked {
                    named: record.prev.to_owned(),
                    actual: self.prev.clone(),
                },
            ));
        }
        if let Some(body) = record.body {
            let entry = parse_body(body)
                .map_err(|e| self.broken(record.seq, Fault::Body(e.to_string())))?;
            if let Some(index) = record.index {
                let derived = Index::of(&entry);
                if derived != *index {
                    return Err(self.broken(
                        record.seq,
                        Fault::Index(format!("body says {derived:?}, columns say {index:?}")),
                    ));
                }
            }
            if let (Some(checkpoint), Some(anchor)) = (&entry.checkpoint, &self.anchor)
                && checkpoint.through_seq == anchor.seq
                && checkpoint.through_hash == anchor.hash
            {
                self.anchor_confirmed = true;
            }
        }
        if let Some(expected) = &self.expected
            && expected.seq == record.seq
            && expected.hash != record.hash
        {
            return Err(self.broken(
                record.seq,
                Fault::HeadMismatch {
                    expected: expected.hash.clone(),
                    found: record.hash.to_owned(),
                },
            ));
        }
        self.prev.clear();
        self.prev.push_str(record.hash);
        self.next += 1;
        self.records += 1;
        Ok(())
    }

    /// Ends the chain.
    pub fn finish(self) -> Result<ChainReport, Broken> {
        if let Some(anchor) = &self.anchor
            && !self.anchor_confirmed
        {
            return Err(self.broken(
                anchor.seq,
                Fault::UnrecordedPrune {
                    through: anchor.seq,
                },
            ));
        }
        let last = self.next - 1;
        if let Some(expected) = &self.expected
            && expected.seq > last
        {
            return Err(self.broken(expected.seq, Fault::Truncated { last }));
        }
        let head = (self.records > 0 || self.anchor.is_some()).then(|| Head {
            seq: last,
            hash: self.prev.clone(),
        });
        Ok(ChainReport {
            chain: self.chain,
            records: self.records,
            anchor: self.anchor,
            head,
        })
    }
}

fn computed_seal(chain: &str, record: &Record) -> [u8; 64] {
    let mut computed = [0u8; 64];
    hex::encode_to_slice(
        seal_raw(
            chain,
            record.seq,
            record.prev.as_bytes(),
            record.body.as_bytes(),
        ),
        &mut computed,
    )
    .expect("64 hex digits");
    computed
}

/// How many records verification reads at a time with their bodies (`--deep`).
pub const PAGE: usize = 8192;

/// How many records verification without `--deep` asks a store for at a time (as
/// [`Sealed`], without bodies, about 250 bytes each). Larger than [`PAGE`]: SQLite reads each
/// page as one range per core, and the cores wait for the slowest range once per page
/// (bench/README.md has the A/B against 8,192).
pub const SEALED_PAGE: usize = 32768;

/// Verifies every chain in `store`. `heads` are heads kept elsewhere, by chain.
pub async fn verify<S: Store>(
    store: &S,
    deep: bool,
    heads: &BTreeMap<String, Head>,
) -> Result<Vec<ChainReport>, VerifyError> {
    let mut reports = Vec::new();
    let chains = store.chains().await?;
    for chain in heads.keys() {
        if !chains.contains(chain) {
            return Err(Broken {
                chain: chain.clone(),
                seq: heads[chain].seq,
                fault: Fault::Truncated { last: 0 },
            }
            .into());
        }
    }
    for chain in chains {
        let anchor = store.anchor(&chain).await?;
        let mut verifier = ChainVerifier::new(&chain, anchor, deep, heads.get(&chain).cloned());
        // Read the first page from the very start: records below the anchor must not exist.
        // The next page is read while the current one is checked.
        if deep {
            let mut page = store.scan(&chain, 0, PAGE).await?;
            while let Some(last) = page.last().map(|r| r.seq) {
                let (next, checked) = tokio::join!(store.scan(&chain, last, PAGE), async {
                    verifier.push_all(&page)
                });
                checked?;
                page = next?;
            }
        } else {
            let mut page = store.sealed(&chain, 0, SEALED_PAGE).await?;
            while let Some(last) = page.last().map(|r| r.seq) {
                let (next, checked) =
                    tokio::join!(store.sealed(&chain, last, SEALED_PAGE), async {
                        page.iter().try_for_each(|r| verifier.push_sealed(r))
                    });
                checked?;
                page = next?;
            }
        }
        reports.push(verifier.finish()?);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Entry, Event, Identity};
    use proptest::prelude::*;

    fn chain(n: u64) -> Vec<Record> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut entry = Entry::new(
                    jiff::Timestamp::from_second(1_800_000_000 + seq as i64).unwrap(),
                    Event::Decide,
                    Identity {
                        username: "system:serviceaccount:shop:agent-support".into(),
                        ..Identity::default()
                    },
                );
                entry.tool = Some(format!("tool_{}", seq % 3));
                let record = Record::seal("gw-0", seq, &prev, &entry);
                prev.clone_from(&record.hash);
                record
            })
            .collect()
    }

    /// Verifies deep, from whole records, and again as [`Sealed`] records (the path of
    /// `audit verify` without `--deep`): both must find the same break.
    fn check(records: &[Record]) -> Result<ChainReport, Broken> {
        let deep = (|| {
            let mut verifier = ChainVerifier::new("gw-0", None, true, None);
            for record in records {
                verifier.push(record)?;
            }
            verifier.finish()
        })();
        let sealed = (|| {
            let mut verifier = ChainVerifier::new("gw-0", None, false, None);
            for record in records {
                verifier.push_sealed(&Sealed::of("gw-0", record))?;
            }
            verifier.finish()
        })();
        assert_eq!(deep, sealed, "deep and sealed verification disagree");
        deep
    }

    #[test]
    fn a_hash_column_of_any_shape_is_named_as_stored() {
        let accented = "é".repeat(32);
        let cases: [&[u8]; 5] = [
            &[b'a'; 63],
            &[b'a'; 65],
            // 64 bytes, but not 64 ASCII digits.
            accented.as_bytes(),
            &[0xff; 64],
            b"",
        ];
        for stored in cases {
            let records = chain(3);
            let r = &records[1];
            let sealed = Sealed::of_stored(
                "gw-0",
                r.seq,
                r.prev.as_bytes(),
                stored,
                b"decide",
                r.body.as_bytes(),
            );
            assert_eq!(sealed.hash.as_str(), String::from_utf8_lossy(stored));
            let mut verifier = ChainVerifier::new("gw-0", None, false, None);
            verifier
                .push_sealed(&Sealed::of("gw-0", &records[0]))
                .unwrap();
            let err = verifier.push_sealed(&sealed).unwrap_err();
            assert_eq!(err.seq, 2);
            assert_eq!(
                err.fault,
                Fault::Altered {
                    computed: r.hash.clone(),
                    stored: String::from_utf8_lossy(stored).into_owned(),
                }
            );
            // A predecessor field of that shape breaks the record's seal.
            let sealed = Sealed::of_stored(
                "gw-0",
                r.seq,
                stored,
                r.hash.as_bytes(),
                b"decide",
                r.body.as_bytes(),
            );
            let mut verifier = ChainVerifier::new("gw-0", None, false, None);
            verifier
                .push_sealed(&Sealed::of("gw-0", &records[0]))
                .unwrap();
            let err = verifier.push_sealed(&sealed).unwrap_err();
            assert!(matches!(err.fault, Fault::Altered { .. }), "{err}");
        }
    }

    #[test]
    fn an_untouched_chain_verifies_and_reports_its_head() {
        let records = chain(20);
        let report = check(&records).unwrap();
        assert_eq!(report.records, 20);
        assert_eq!(report.head.unwrap().hash, records[19].hash);
    }

    #[test]
    fn a_body_round_trips_and_a_newer_schema_is_refused() {
        let records = chain(1);
        let entry = records[0].entry().unwrap();
        assert_eq!(entry.tool.as_deref(), Some("tool_1"));
        let newer = records[0].body.replacen("\"schema\":1", "\"schema\":2", 1);
        let err = parse_body(&newer).unwrap_err().to_string();
        assert!(err.contains("schema 2"), "{err}");
        let unknown = records[0].body.replacen('{', "{\"smuggled\":true,", 1);
        let err = parse_body(&unknown).unwrap_err().to_string();
        assert!(err.contains("smuggled"), "{err}");
    }

    #[test]
    fn seals_checked_on_every_core_still_name_the_first_broken_record() {
        let mut records = chain(5000);
        records[3000].body.push(' ');
        records[4000].hash.replace_range(0..1, "x");
        let mut verifier = ChainVerifier::new("gw-0", None, false, None);
        let err = verifier.push_all(&records).unwrap_err();
        assert_eq!(err.seq, 3001);
        assert!(matches!(err.fault, Fault::Altered { .. }));
        let mut verifier = ChainVerifier::new("gw-0", None, false, None);
        verifier.push_all(&chain(5000)).unwrap();
        assert_eq!(verifier.finish().unwrap().records, 5000);
    }

    #[test]
    fn a_record_moved_to_another_chain_does_not_verify() {
        let records = chain(2);
        let mut verifier = ChainVerifier::new("gw-1", None, false, None);
        let err = verifier.push(&records[0]).unwrap_err();
        assert_eq!(err.seq, 1);
        assert!(matches!(err.fault, Fault::Altered { .. }));
    }

    proptest! {
        /// Whatever single byte of whichever record an attacker changes (body, prev or hash),
        /// verification fails at that record or, for its hash, at the next one.
        #[test]
        fn any_changed_byte_is_caught_at_its_record(
            target in 0usize..12, field in 0u8..3, at in any::<prop::sample::Index>(), byte in 0x20u8..0x7f,
        ) {
            let mut records = chain(12);
            let record = &mut records[target];
            let text = match field { 0 => &mut record.body, 1 => &mut record.prev, _ => &mut record.hash };
            let i = at.index(text.len());
            prop_assume!(text.as_bytes()[i] != byte);
            let mut bytes = std::mem::take(text).into_bytes();
            bytes[i] = byte;
            *text = String::from_utf8(bytes).unwrap();
            let err = check(&records).unwrap_err();
            let seq = target as u64 + 1;
            prop_assert_eq!(err.seq, seq, "{}", err);
        }

        /// Removing any record, or swapping any two, is caught at the first affected position.
        #[test]
        fn any_removed_or_swapped_record_is_caught(a in 0usize..12, b in 0usize..12) {
            let mut removed = chain(12);
            removed.remove(a);
            let err = check(&removed);
            if a == 11 {
                // The tail alone: only a head kept elsewhere catches it.
                prop_assert!(err.is_ok());
            } else {
                prop_assert_eq!(err.unwrap_err().seq, a as u64 + 1);
            }
            prop_assume!(a != b);
            let mut swapped = chain(12);
            swapped.swap(a, b);
            prop_assert_eq!(check(&swapped).unwrap_err().seq, a.min(b) as u64 + 1);
        }
    }
}
