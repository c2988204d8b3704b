//! Words in messages for people.

/// `n` followed by `noun`, in the plural unless `n` is 1: "1 host",
/// "2 hosts", "0 hosts". Only for nouns whose plural adds an "s".
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(count(1u32, "host"), "1 host");
        assert_eq!(count(2u32, "host"), "2 hosts");
        assert_eq!(count(0u64, "site"), "0 sites");
    }
}
