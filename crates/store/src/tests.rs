#[cfg(test)] mod t{}
