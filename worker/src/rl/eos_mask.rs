//! Response mask from generated token ids: keep tokens up to and including the
//! first EOS, zero everything after it (and padding).

use tch::{Kind, Tensor};

/// Float 0/1 response mask: 1 for every token up to and including the first
/// of `eos_ids` in its row, 0 after it. Rows without one keep every token
/// (truncated responses). With `pad_id = Some(p)` (`p` not an EOS), tokens
/// equal to `p` are zeroed too (padding of a batch not padded with EOS).
///
/// # Shapes
/// - `tokens`: `[b, t]` integer ids of the response (prompt excluded).
/// - returns `[b, t]`, kind `Float`, on the device of `tokens`.
pub fn response_mask(tokens: &Tensor, eos_ids: &[i64], pad_id: Option<i64>) -> Tensor {
    let is_eos = is_any(tokens, eos_ids).to_kind(Kind::Int64);
    // number of EOS tokens strictly before position t
    let eos_before = is_eos.cumsum(1, Kind::Int64) - &is_eos;
    let mut keep = eos_before.eq(0);
    if let Some(p) = pad_id {
        if !eos_ids.contains(&p) {
            keep = keep.logical_and(&tokens.ne(p));
        }
    }
    keep.to_kind(Kind::Float)
}

/// Whether each row contains one of `eos_ids` (rows without were truncated).
///
/// # Shapes
/// - `tokens`: `[b, t]` integer ids; returns `[b]`, kind `Bool`.
pub fn contains_eos(tokens: &Tensor, eos_ids: &[i64]) -> Tensor {
    is_any(tokens, eos_ids).any_dim(1, false)
}

/// Bool: which of `tokens` are one of `ids`.
fn is_any(tokens: &Tensor, ids: &[i64]) -> Tensor {
    let ids = Tensor::from_slice(ids).to_device(tokens.device());
    Tensor::isin(tokens, &ids, false, false)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn mask_up_to_first_eos() {
        let eos = &[2];
        let tokens = Tensor::from_slice(&[
            5i64, 6, 2, 7, 2, // EOS at 2: keep 0..=2, drop the rest (incl. 2nd EOS)
            2, 9, 9, 9, 9, // EOS first token: keep only it
            5, 6, 7, 8, 9, // no EOS: keep everything
            5, 2, 0, 0, 0, // EOS then padding 0
        ])
        .view([4, 5]);
        let m = response_mask(&tokens, eos, None);
        assert_eq!(m.kind(), Kind::Float);
        assert_vec_close(
            &v(&m),
            &[
                1.0, 1.0, 1.0, 0.0, 0.0, //
                1.0, 0.0, 0.0, 0.0, 0.0, //
                1.0, 1.0, 1.0, 1.0, 1.0, //
                1.0, 1.0, 0.0, 0.0, 0.0,
            ],
            0.0,
        );
        let has = Vec::<bool>::try_from(&contains_eos(&tokens, eos)).unwrap();
        assert_eq!(has, vec![true, true, false, true]);
    }

    #[test]
    fn mask_with_distinct_pad() {
        // truncated row padded with pad id 0 but no EOS; pad == eos is a no-op
        let tokens = Tensor::from_slice(&[5i64, 6, 0, 0, 5, 2, 0, 0]).view([2, 4]);
        let m = response_mask(&tokens, &[2], Some(0));
        assert_vec_close(&v(&m), &[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], 0.0);
        let m2 = response_mask(&tokens, &[2], Some(2));
        assert_vec_close(&v(&m2), &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 0.0);
    }

    #[test]
    fn any_of_several_stop_ids_ends_a_row() {
        // Llama 3 stops on <|eot_id|> (8) as well as <|end_of_text|> (2).
        let tokens = Tensor::from_slice(&[5i64, 8, 7, 2, 5, 6, 2, 8, 5, 6, 7, 9]).view([3, 4]);
        let m = response_mask(&tokens, &[2, 8], None);
        assert_vec_close(
            &v(&m),
            &[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0],
            0.0,
        );
        let has = Vec::<bool>::try_from(&contains_eos(&tokens, &[2, 8])).unwrap();
        assert_eq!(has, vec![true, true, false]);
        // No stop ids: every token counts, no row ended.
        assert_vec_close(&v(&response_mask(&tokens, &[], None)), &[1.0; 12], 0.0);
    }
}
