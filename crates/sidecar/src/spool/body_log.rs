//! Bodies of a burst, kept outside SQLite in append-only segment files.
//!
//! Why: a body SQLite holds is written twice, to the WAL and then by a checkpoint to the database
//! file, as a chain of overflow pages each framed on its own. At saturation that was most of the
//! writer's CPU. A transaction that stores many bodies (a burst) appends them to a segment here
//! instead, flushes the segment, and then commits only where each one is (`body_segment`,
//! `body_offset`, `body_length`) with its row: written once, in one `pwrite` each. That costs one more
//! flush per commit, so a commit of a body or two (a steady rate) keeps them inline, where that
//! flush would cost more than the copying it saves (see `sqlite.rs`, `LOG_BODIES_FROM`).
//!
//! A segment is `<spool>-body-<number>`, appended to only by the writer, and let go of once no row
//! refers to it ([`BodyLog::delete`], after the commit that dropped the last such row). Bytes a failed
//! transaction appended are never referenced: the segment's end is tracked here, not read from the
//! file, and a restarted writer starts a new segment.
//!
//! A segment let go of is kept as the free segment `<spool>-body-free-<number>` when none is kept yet,
//! and the next segment started takes its file instead of a new one (PostgreSQL recycles its WAL
//! segments the same way). Why: appending to a new file allocates its blocks and grows it, so every
//! flush also writes the file's metadata; overwriting blocks a full segment already has writes only
//! the data. A spool at its `maxBytes` (where every spool with the default 7-day `retainDelivered`
//! ends up) lets go of a segment for every one it fills, so a burst into it appends to recycled files
//! only. The free segment's bytes count against `maxBytes` like any other's. A `spool` tool beside
//! the writer that kept a segment open across its reuse could read the new bytes where a deleted file
//! would still have given the old; tools run for seconds, and nothing they read is delivered.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A segment takes no more appends once it is this long, unless told less ([`BodyLog::set_segment_bytes`]).
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Where one body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    pub segment: i64,
    pub offset: i64,
    pub length: i64,
}

/// The segments beside one spool file, and the one being appended to.
pub struct BodyLog {
    spool: PathBuf,
    segment_bytes: u64,
    /// Every segment on disk, with its length (a recycled one's whole file until appends pass it).
    segments: BTreeMap<i64, u64>,
    /// The free segment, if one is kept: its number and length.
    free: Option<(i64, u64)>,
    /// The highest segment number used since the log was opened, or found on disk.
    last_number: i64,
    appending: Option<Appending>,
    /// The segment last read from, kept open: a drain reads one segment after another.
    reading: Option<(i64, File)>,
}

struct Appending {
    segment: i64,
    file: File,
    /// Where the next body goes.
    end: u64,
    /// Whether bytes were appended since the last flush.
    unflushed: bool,
    /// Whether the file was created (or renamed from the free segment) since the last flush: then
    /// its directory entry is flushed too, before any row can refer to it under this name.
    created: bool,
}

/// What follows the spool's file name in a segment's: `<spool>-body-<number>`.
const SEGMENT_INFIX: &str = "-body-";
/// What follows it in the free segment's: `<spool>-body-free-<number>`.
const FREE_INFIX: &str = "-body-free-";

fn folder(spool: &Path) -> &Path {
    spool.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

impl BodyLog {
    /// Finds the segments beside the spool at `spool`. Appends will go to a new one.
    pub fn open(spool: &Path) -> std::io::Result<BodyLog> {
        let mut segments = BTreeMap::new();
        for (path, segment) in segment_files(spool)? {
            segments.insert(segment, std::fs::metadata(&path)?.len());
        }
        let mut free = None;
        let mut found = files_beside(spool, FREE_INFIX)?;
        found.sort_by_key(|(_, number)| std::cmp::Reverse(number.parse::<i64>().ok()));
        for (path, number) in found {
            match number.parse::<i64>() {
                // One is kept (the newest); more are left only by a crash between two renames.
                Ok(number) if free.is_none() => free = Some((number, std::fs::metadata(&path)?.len())),
                _ => std::fs::remove_file(&path)?,
            }
        }
        let last_number = segments.keys().next_back().copied().into_iter().chain(free.map(|(n, _)| n)).max();
        Ok(BodyLog {
            spool: spool.to_path_buf(),
            segment_bytes: SEGMENT_BYTES,
            segments,
            free,
            last_number: last_number.unwrap_or(0),
            appending: None,
            reading: None,
        })
    }

    /// How long a segment grows before the next append starts another: a segment's bytes count
    /// against `maxBytes` until its last body goes, so a small spool needs small segments.
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes.min(SEGMENT_BYTES);
    }

    /// The file of `segment`.
    pub fn path(&self, segment: i64) -> PathBuf {
        self.beside(SEGMENT_INFIX, segment)
    }

    /// The file of the free segment that was `segment`.
    fn free_path(&self, segment: i64) -> PathBuf {
        self.beside(FREE_INFIX, segment)
    }

    fn beside(&self, infix: &str, number: i64) -> PathBuf {
        let name = self.spool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        folder(&self.spool).join(format!("{name}{infix}{number:010}"))
    }

    /// Appends `body` to the current segment (starting a new one when there is none or it is full).
    /// It is durable only after [`BodyLog::flush`].
    pub fn append(&mut self, body: &[u8]) -> std::io::Result<BodyRef> {
        if self.appending.as_ref().is_none_or(|a| a.end >= self.segment_bytes) {
            self.start_segment()?;
        }
        let Some(appending) = self.appending.as_mut() else { unreachable!("a segment was just started") };
        let offset = appending.end;
        if let Err(error) = appending.file.write_all_at(body, offset) {
            // How much landed is unknown: the next append starts a new segment.
            self.appending = None;
            return Err(error);
        }
        appending.unflushed = true;
        appending.end += body.len() as u64;
        let len = self.segments.entry(appending.segment).or_default();
        *len = (*len).max(appending.end);
        Ok(BodyRef { segment: appending.segment, offset: offset as i64, length: body.len() as i64 })
    }

    fn start_segment(&mut self) -> std::io::Result<()> {
        // Never appended to again: a previous segment may end in bytes a failed transaction left.
        // Nor is a number used twice while the log is open: a reader whose snapshot still has a row
        // naming a segment let go of (a `spool` tool beside the writer) must find nothing, not new bytes.
        let segment = self.last_number + 1;
        self.last_number = segment;
        let path = self.path(segment);
        // What a recycled file holds past the appends is never referenced: rows say where each body ends.
        let recycled = self.free.take().and_then(|(free, len)| {
            let taken = std::fs::rename(self.free_path(free), &path)
                .and_then(|()| OpenOptions::new().read(true).write(true).open(&path));
            match taken {
                Ok(file) => Some((file, len)),
                Err(error) => {
                    tracing::warn!(%error, "spool: the free body segment could not be reused; starting a new one");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            }
        });
        let (file, len) = match recycled {
            Some(recycled) => recycled,
            None => (OpenOptions::new().read(true).write(true).create_new(true).open(&path)?, 0),
        };
        self.segments.insert(segment, len);
        self.appending = Some(Appending { segment, file, end: 0, unflushed: false, created: true });
        Ok(())
    }

    /// Makes what was appended durable: before the transaction that refers to it commits.
    pub fn flush(&mut self) -> std::io::Result<()> {
        let Some(appending) = self.appending.as_mut() else { return Ok(()) };
        if appending.unflushed {
            appending.file.sync_data()?;
            appending.unflushed = false;
        }
        if appending.created {
            File::open(folder(&self.spool))?.sync_all()?;
            appending.created = false;
        }
        Ok(())
    }

    /// Reads one body back.
    pub fn read(&mut self, at: BodyRef) -> std::io::Result<Vec<u8>> {
        let (Ok(offset), Ok(length)) = (u64::try_from(at.offset), usize::try_from(at.length)) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a negative body offset or length"));
        };
        if self.reading.as_ref().is_none_or(|(segment, _)| *segment != at.segment) {
            self.reading = Some((at.segment, File::open(self.path(at.segment))?));
        }
        let Some((_, file)) = self.reading.as_ref() else { unreachable!("just opened") };
        let mut body = vec![0; length];
        file.read_exact_at(&mut body, offset)?;
        Ok(body)
    }

    /// The segment being appended to.
    pub fn appending(&self) -> Option<i64> {
        self.appending.as_ref().map(|a| a.segment)
    }

    /// Every segment on disk with its length.
    pub fn segments(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.segments.iter().map(|(segment, len)| (*segment, *len))
    }

    /// Bytes of every segment on disk, the free one's included.
    pub fn bytes(&self) -> u64 {
        self.segments.values().sum::<u64>() + self.free.map_or(0, |(_, len)| len)
    }

    /// Whether a segment of `len` bytes let go now would be kept as the free segment: none is kept
    /// yet, and it is long enough that the next segment never appends past its end.
    fn would_keep(&self, len: u64) -> bool {
        self.free.is_none() && len >= self.segment_bytes
    }

    /// What letting go of `segments` ([`BodyLog::delete`], in this order) gives back: neither the one
    /// kept as the free segment nor the one being appended to (the next body goes there, or to the
    /// segment that follows it).
    pub fn bytes_freed(&self, segments: &[(i64, u64)]) -> u64 {
        let kept = segments.iter().position(|(_, len)| self.would_keep(*len));
        let freed = segments
            .iter()
            .enumerate()
            .filter(|(index, (segment, _))| Some(*index) != kept && Some(*segment) != self.appending());
        freed.map(|(_, (_, len))| len).sum()
    }

    /// Lets go of a segment no row refers to: it becomes the free segment ([`BodyLog::would_keep`])
    /// or is deleted. When it is the one being appended to, the next append starts another.
    pub fn delete(&mut self, segment: i64) -> std::io::Result<()> {
        if self.appending() == Some(segment) {
            self.appending = None;
        }
        if self.reading.as_ref().is_some_and(|(open, _)| *open == segment) {
            self.reading = None;
        }
        let len = self.segments.get(&segment).copied().unwrap_or(0);
        if self.would_keep(len) && std::fs::rename(self.path(segment), self.free_path(segment)).is_ok() {
            self.free = Some((segment, len));
        } else {
            match std::fs::remove_file(self.path(segment)) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        self.segments.remove(&segment);
        Ok(())
    }
}

/// The segment files beside the spool at `spool`, with their numbers.
pub fn segment_files(spool: &Path) -> std::io::Result<Vec<(PathBuf, i64)>> {
    let mut found: Vec<(PathBuf, i64)> = files_beside(spool, SEGMENT_INFIX)?
        .into_iter()
        .filter_map(|(path, number)| Some((path, number.parse().ok()?)))
        .collect();
    found.sort_by_key(|(_, segment)| *segment);
    Ok(found)
}

/// The files beside the spool at `spool` named `<spool><infix><rest>`, each with its `rest` (none
/// when the folder does not exist yet): the spool's companions, body segments and set-aside copies.
pub fn files_beside(spool: &Path, infix: &str) -> std::io::Result<Vec<(PathBuf, String)>> {
    let Some(name) = spool.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let prefix = format!("{name}{infix}");
    let entries = match std::fs::read_dir(folder(spool)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(rest) = entry.file_name().to_str().and_then(|n| n.strip_prefix(&prefix)) {
            found.push((entry.path(), rest.to_string()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_come_back_from_segments_and_a_full_segment_takes_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut log = BodyLog::open(&spool).unwrap();
        let first = log.append(b"first").unwrap();
        let big = vec![7u8; SEGMENT_BYTES as usize];
        let second = log.append(&big).unwrap();
        assert_eq!((first.segment, first.offset, second.segment, second.offset), (1, 0, 1, 5), "one segment so far");
        let third = log.append(b"third").unwrap();
        assert_eq!((third.segment, third.offset), (2, 0), "the first is past SEGMENT_BYTES");
        log.flush().unwrap();
        assert_eq!(log.read(first).unwrap(), b"first");
        assert_eq!(log.read(second).unwrap(), big);
        assert_eq!(log.read(third).unwrap(), b"third");
        assert_eq!(log.bytes(), SEGMENT_BYTES + 10);
        assert!(log.path(1).ends_with("spool.db-body-0000000001"), "{}", log.path(1).display());
    }

    #[test]
    fn a_reopened_log_appends_to_a_new_segment_and_deletes_only_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut log = BodyLog::open(&spool).unwrap();
        let kept = log.append(b"kept").unwrap();
        log.flush().unwrap();
        drop(log);
        let mut log = BodyLog::open(&spool).unwrap();
        assert_eq!(log.segments().collect::<Vec<_>>(), [(1, 4)]);
        let next = log.append(b"next").unwrap();
        assert_eq!(next.segment, 2, "bytes after a crash's last commit are never appended to");
        assert_eq!(log.read(kept).unwrap(), b"kept");
        log.set_segment_bytes(4);
        let own = log.append(b"own").unwrap();
        assert_eq!(own.segment, 3, "segment 2 is past the smaller size");
        log.delete(3).unwrap();
        assert!(!log.path(3).exists(), "shorter than a segment: deleted, not kept");
        assert_eq!(log.append(b"again").unwrap().segment, 4, "a deleted segment's number is not used again");
        log.delete(1).unwrap();
        assert!(!log.path(1).exists());
        assert!(log.free_path(1).exists(), "a full segment is kept as the free one");
        log.delete(2).unwrap();
        assert!(!log.path(2).exists() && !log.free_path(2).exists(), "only one is kept");
        assert_eq!(log.bytes(), 5 + 4, "the free segment's bytes count");
        assert!(log.read(kept).is_err(), "a segment let go of is gone, also when it was open for reading");
    }

    #[test]
    fn an_emptied_segment_becomes_the_next_one_and_its_old_bytes_are_never_read() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db");
        let mut log = BodyLog::open(&spool).unwrap();
        log.set_segment_bytes(16);
        let old = log.append(&[b'o'; 20]).unwrap();
        let second = log.append(b"second").unwrap();
        log.flush().unwrap();
        assert_eq!((old.segment, second.segment), (1, 2));
        let inode = std::fs::metadata(log.path(1)).unwrap().ino();
        assert_eq!(log.bytes_freed(&[(1, 20), (2, 6)]), 0, "1 would be kept; 2 is being appended to");
        log.delete(1).unwrap();
        assert_eq!(log.bytes_freed(&[(2, 6)]), 0, "the one being appended to is not freed");
        assert_eq!(log.bytes(), 20 + 6);

        log.append(b"fills 2 up").unwrap();
        let new = log.append(b"new").unwrap();
        log.flush().unwrap();
        assert_eq!((new.segment, new.offset), (3, 0));
        assert_eq!(std::fs::metadata(log.path(3)).unwrap().ino(), inode, "segment 3 is segment 1's file");
        assert!(!log.free_path(1).exists());
        assert_eq!(log.read(new).unwrap(), b"new", "only the new body, though the file holds more");
        assert_eq!(log.segments().collect::<Vec<_>>(), [(2, 16), (3, 20)], "a recycled file counts whole");
        assert!(log.read(old).is_err());

        // With a free segment kept, the next one let go of gives its room back.
        log.delete(2).unwrap();
        assert!(log.free_path(2).exists());
        assert_eq!(log.bytes_freed(&[(3, 20)]), 0, "being appended to");
        drop(log);
        std::fs::write(dir.path().join("spool.db-body-free-0000000009"), b"left by a crash").unwrap();
        let mut log = BodyLog::open(&spool).unwrap();
        assert_eq!(log.bytes(), 20 + 15, "segment 3 and the newest free segment: the other is deleted on open");
        assert!(!log.free_path(2).exists());
        assert_eq!(log.append(b"after").unwrap().segment, 10, "numbers go on from the highest on disk");
    }
}
