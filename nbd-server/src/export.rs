//! The exported file and what the handshake says about it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::tflag;

/// One exported file: its name, size and access mode, and counters shared by every
/// connection to it.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    path: PathBuf,
    file: reactor::fs::File,
    size: u64,
    read_only: bool,
    pub(crate) stats: Counters,
    /// The last data region found in the file (see `extents.rs`).
    pub(crate) data_region: crate::extents::DataRegion,
    /// Set for an `O_DIRECT` export (`Cache::None`).
    direct: Option<crate::direct::Direct>,
}

/// How the export uses the page cache (`--cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Cache {
    /// Through the page cache: writes are acknowledged once the kernel has them, FLUSH and
    /// FUA make them durable.
    #[default]
    Writeback,
    /// Around it (`O_DIRECT`): every read and write goes to the device, with aligned buffers,
    /// through the ring on io_uring. The alignment is advertised with `NBD_INFO_BLOCK_SIZE`;
    /// unaligned requests are served too (read-modify-write at the edges). FLUSH and FUA
    /// still make writes durable (`fdatasync`: the device's own cache).
    None,
}

/// Counters of the work done for an export, summed over its connections.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) polling_pauses: AtomicU64,
    pub(crate) requests_waited: AtomicU64,
}

/// A snapshot of an export's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Connections that entered transmission.
    pub connections: u64,
    /// Requests served (DISC included).
    pub requests: u64,
    /// `fdatasync` calls made for FLUSH and FUA.
    pub syncs: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Times an IoThread stopped busy polling because one of its connections had more than
    /// [`Config::poll_depth`](crate::Config::poll_depth) requests unanswered (admitted, and
    /// their reply not yet sent).
    pub polling_pauses: u64,
    /// Requests that had to wait for their I/O (a READ of data the page cache did not hold, a
    /// WRITE that could not be made on the IoThread, a FLUSH), or met the reader's I/O budget
    /// spent, and went on as a task of their own. The others, cached READs and inline WRITEs above all, were served within the
    /// reader's poll, without a task.
    pub requests_waited: u64,
}

impl Export {
    /// Opens `path` (read-write unless `read_only`) and measures its size. Regular files and
    /// block devices work; the size is fixed for the life of the export.
    ///
    /// # Errors
    /// The file cannot be opened, or its size cannot be found (`lseek`); an export `name`
    /// or `description` longer than the protocol's 4096 bytes (`InvalidInput`).
    ///
    /// ```
    /// use nbd_server::Export;
    /// use nbd_server::proto::tflag;
    /// let path = std::env::temp_dir().join(format!("export-doc-{}", std::process::id()));
    /// std::fs::write(&path, vec![0u8; 65536])?;
    /// let e = Export::open(&path, "disk", "", true)?;
    /// assert_eq!(e.size(), 65536);
    /// assert!(e.answers_to(b"disk") && e.answers_to(b"") && !e.answers_to(b"other"));
    /// assert_ne!(e.transmission_flags(false) & tflag::READ_ONLY, 0);
    /// assert_eq!(e.transmission_flags(false) & tflag::SEND_DF, 0);
    /// assert_ne!(e.transmission_flags(true) & tflag::SEND_DF, 0);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn open(
        path: impl AsRef<Path>,
        name: &str,
        description: &str,
        read_only: bool,
    ) -> io::Result<Arc<Export>> {
        Export::open_cached(path, name, description, read_only, Cache::Writeback)
    }

    /// [`open`](Self::open), using the page cache as `cache` says.
    ///
    /// # Errors
    /// As `open`; with [`Cache::None`], `Unsupported` when the file system refuses
    /// `O_DIRECT`, and `InvalidInput` when the size is not a multiple of the alignment
    /// `O_DIRECT` needs (a direct write of the last partial block would grow the file).
    ///
    /// ```no_run
    /// use nbd_server::{Cache, Export};
    /// let e = Export::open_cached("/var/lib/images/disk.raw", "disk", "", false, Cache::None)?;
    /// assert!(e.direct_alignment().is_some_and(|a| a >= 512));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn open_cached(
        path: impl AsRef<Path>,
        name: &str,
        description: &str,
        read_only: bool,
        cache: Cache,
    ) -> io::Result<Arc<Export>> {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        for (what, s) in [("export name", name), ("description", description)] {
            if s.len() > crate::proto::MAX_STRING || s.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{what} longer than 4096 bytes or containing NUL"),
                ));
            }
        }
        let path = path.as_ref().to_owned();
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let flags = if cache == Cache::None {
            libc::O_DIRECT
        } else {
            0
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) if cache == Cache::None => io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{}: the file system does not support O_DIRECT (--cache none)",
                        path.display()
                    ),
                ),
                _ => named(e),
            })?;
        let size = f.seek(std::io::SeekFrom::End(0))?;
        let direct = match cache {
            Cache::Writeback => None,
            Cache::None => {
                let align = crate::direct::alignment(&f).map_err(named)?;
                if size % align != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{}: --cache none needs a size that is a multiple of {align} \
                             (O_DIRECT's alignment here), not {size}",
                            path.display()
                        ),
                    ));
                }
                Some(crate::direct::Direct::new(align))
            }
        };
        Ok(Arc::new(Export {
            name: name.to_owned(),
            description: description.to_owned(),
            path,
            file: reactor::fs::File::from_std(f),
            size,
            read_only,
            stats: Counters::default(),
            data_region: Default::default(),
            direct,
        }))
    }

    /// The export's name (clients asking for `""` get this export too: it is the default).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a client asking for `name` gets this export.
    pub fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// The description sent with `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file.
    pub(crate) fn file(&self) -> &reactor::fs::File {
        &self.file
    }

    /// The `O_DIRECT` state of a [`Cache::None`] export.
    pub(crate) fn direct(&self) -> Option<&crate::direct::Direct> {
        self.direct.as_ref()
    }

    /// The alignment of an `O_DIRECT` export ([`Cache::None`]); `None` for one that goes
    /// through the page cache.
    pub fn direct_alignment(&self) -> Option<u64> {
        self.direct.as_ref().map(crate::direct::Direct::align)
    }

    /// The smallest block the export serves without extra work: 1 through the page cache,
    /// the `O_DIRECT` alignment around it (`NBD_INFO_BLOCK_SIZE`'s minimum).
    pub fn min_block(&self) -> u32 {
        self.direct_alignment().map_or(1, |a| a as u32)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The transmission flags the handshake sends, for a client that negotiated
    /// `structured` replies or not (`NBD_FLAG_SEND_DF` goes only with them).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_TRIM
            | tflag::SEND_WRITE_ZEROES
            | tflag::SEND_FAST_ZERO
            | tflag::SEND_CACHE
            // One file, one page cache: a flush on any connection covers them all.
            | tflag::CAN_MULTI_CONN;
        if self.read_only {
            f |= tflag::READ_ONLY;
        }
        if structured {
            f |= tflag::SEND_DF;
        }
        f
    }

    /// The counters so far.
    pub fn stats(&self) -> ExportStats {
        let c = &self.stats;
        // Relaxed: independent statistics counters, no data published through them.
        ExportStats {
            connections: c.connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            polling_pauses: c.polling_pauses.load(Ordering::Relaxed),
            requests_waited: c.requests_waited.load(Ordering::Relaxed),
        }
    }
}
