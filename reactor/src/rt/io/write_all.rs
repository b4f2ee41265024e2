//! The write-all loop that files and streams share: one owned-buffer write per short write.

use std::future::Future;
use std::io;

use super::buf::Slice;

/// Writes all of `buf` through `write`, which gets the unwritten rest and how many bytes are
/// already written, and returns what one write call returns. Stops at the first error, and
/// with `WriteZero` if a write took nothing. The buffer always comes back.
pub(crate) async fn write_all<F, Fut>(mut buf: Vec<u8>, mut write: F) -> (io::Result<()>, Vec<u8>)
where
    F: FnMut(Slice<Vec<u8>>, u64) -> Fut,
    Fut: Future<Output = (io::Result<usize>, Slice<Vec<u8>>)>,
{
    let mut done = 0;
    while done < buf.len() {
        let (res, slice) = write(Slice::new(buf, done), done as u64).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
            Ok(n) => done += n,
            Err(e) => return (Err(e), buf),
        }
    }
    (Ok(()), buf)
}
