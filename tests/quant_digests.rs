//! The searched int4 quantizers (q4_s, iq4_nl, q4_k) pinned byte for byte: the sha256 of their
//! output on a fixed, seeded set of rows. The digests were recorded from the quantizers before
//! they were made faster; any change to the search that changes a single byte fails here. A
//! change that is meant to change the output (a better search) must record new digests and say
//! why in its commit.
//!
//! The rows cover what the searches branch on: bell-shaped and heavy-tailed weights, weights at
//! tiny and large scales (f16 rounding of the scales, the 2^-13 unit of q4_s), exact zeros in
//! whole blocks, sub-blocks and scattered positions, constant runs, lone outliers, and non-finite
//! values; rows from 256 to 32,768 weights wide (and iq4_nl's rows that are not whole super-blocks).

use grok1::quant::measure::{sample, Dist, Rng};
use grok1::quant::QuantType;
use sha2::{Digest, Sha256};

/// How a case alters the sampled weights.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Plain,
    /// Every weight times this factor.
    Scaled(f32),
    /// Whole 256-weight blocks, single 16- and 32-weight runs, and 1 in 8 weights set to zero.
    Zeros,
    /// 1 in 97 weights times 40, and one block with a single huge weight among tiny ones.
    Outliers,
    /// Constant runs of both signs, and weights on a coarse lattice (many ties in the search).
    Lattice,
    /// NaN and infinities scattered through the row.
    NonFinite,
}

struct Case {
    dist: Dist,
    cols: usize,
    rows: usize,
    seed: u64,
    shape: Shape,
}

const fn case(dist: Dist, cols: usize, rows: usize, seed: u64, shape: Shape) -> Case {
    Case {
        dist,
        cols,
        rows,
        seed,
        shape,
    }
}

use Dist::{Gaussian, Laplace, StudentT};
use Shape::*;

/// About 3.3 M weights in all.
const CASES: [Case; 18] = [
    case(Gaussian, 256, 512, 1, Plain),
    case(Gaussian, 4096, 64, 2, Plain),
    case(Gaussian, 32768, 16, 3, Plain),
    case(StudentT(3), 512, 256, 4, Plain),
    case(StudentT(3), 6144, 32, 5, Plain),
    case(Laplace, 1024, 128, 6, Plain),
    case(Laplace, 32768, 8, 7, Plain),
    case(Gaussian, 2048, 64, 8, Scaled(1e-4)),
    case(StudentT(3), 4096, 32, 9, Scaled(1e-4)),
    case(Laplace, 1024, 64, 10, Scaled(3e-7)),
    case(Gaussian, 512, 64, 11, Scaled(2e3)),
    case(Gaussian, 4096, 32, 12, Zeros),
    case(StudentT(3), 768, 128, 13, Zeros),
    case(Gaussian, 8192, 16, 14, Outliers),
    case(Laplace, 256, 256, 15, Outliers),
    case(Gaussian, 2048, 32, 16, Lattice),
    case(StudentT(4), 1024, 32, 17, NonFinite),
    case(StudentT(5), 16384, 8, 18, Plain),
];

/// Extra widths for iq4_nl only: whole 32-weight blocks that are not whole super-blocks.
const IQ4_NL_ODD: [Case; 2] = [
    case(Gaussian, 288, 256, 21, Plain),
    case(StudentT(3), 2080, 32, 22, Outliers),
];

fn weights(c: &Case) -> Vec<f32> {
    let mut w = sample(c.dist, c.cols * c.rows, c.seed);
    let mut rng = Rng::new(c.seed ^ 0x5eed);
    match c.shape {
        Plain => {}
        Scaled(f) => w.iter_mut().for_each(|v| *v *= f),
        Zeros => {
            for (i, v) in w.iter_mut().enumerate() {
                let block = i / 256;
                let (in_block, in_row) = (i % 256, i % c.cols);
                if block % 5 == 1
                    || (block % 5 == 2 && (48..64).contains(&in_block))
                    || (block % 5 == 3 && (64..96).contains(&in_block))
                    || (in_row % 8 == 3 && block % 5 == 4)
                {
                    *v = 0.0;
                }
            }
        }
        Outliers => {
            for v in w.iter_mut() {
                if rng.next_u64().is_multiple_of(97) {
                    *v *= 40.0;
                }
            }
            let n = w.len();
            let start = (n / 2) / 256 * 256;
            for v in &mut w[start..start + 256.min(n - start)] {
                *v *= 1e-6;
            }
            w[start + 17] = -3.0;
        }
        Lattice => {
            for (i, v) in w.iter_mut().enumerate() {
                match (i / 256) % 4 {
                    0 => *v = (*v * 4.0).round() / 4.0,
                    1 => *v = if (i / 16) % 2 == 0 { 0.5 } else { -0.75 },
                    2 => *v = (*v * 2.0).round() * 1e-3,
                    _ => {}
                }
            }
        }
        NonFinite => {
            for v in w.iter_mut() {
                match rng.next_u64() % 211 {
                    0 => *v = f32::NAN,
                    1 => *v = f32::INFINITY,
                    2 => *v = f32::NEG_INFINITY,
                    _ => {}
                }
            }
        }
    }
    w
}

fn digest(t: QuantType, c: &Case) -> String {
    let w = weights(c);
    let rb = t.row_bytes(c.cols).expect("whole blocks");
    let mut out = vec![0u8; rb];
    let mut h = Sha256::new();
    for row in w.chunks_exact(c.cols) {
        t.quantize_row(row, &mut out);
        h.update(&out);
    }
    hex::encode(h.finalize())
}

/// Digests of every case, in `CASES` order (then `IQ4_NL_ODD` for iq4_nl).
fn all_digests(t: QuantType) -> Vec<String> {
    let odd: &[Case] = if t == QuantType::Iq4Nl {
        &IQ4_NL_ODD
    } else {
        &[]
    };
    CASES.iter().chain(odd).map(|c| digest(t, c)).collect()
}

fn check(t: QuantType, expected: &[&str]) {
    let got = all_digests(t);
    let cases: Vec<&Case> = CASES.iter().chain(IQ4_NL_ODD.iter()).collect();
    let mut bad = Vec::new();
    for (i, g) in got.iter().enumerate() {
        if expected.get(i) != Some(&g.as_str()) {
            let c = cases[i];
            bad.push(format!(
                "case {i} ({} x {} {} {:?}, seed {}): got {g}",
                c.rows,
                c.cols,
                c.dist.name(),
                c.shape,
                c.seed
            ));
        }
    }
    assert_eq!(got.len(), expected.len(), "{t}: digest count");
    assert!(bad.is_empty(), "{t} output changed:\n{}", bad.join("\n"));
}

#[test]
fn q4_s_output_is_unchanged() {
    check(QuantType::Q4S, Q4_S);
}

#[test]
fn iq4_nl_output_is_unchanged() {
    check(QuantType::Iq4Nl, IQ4_NL);
}

#[test]
fn q4_k_output_is_unchanged() {
    check(QuantType::Q4K, Q4_K);
}

/// Prints the digests in the form of the tables below, for recording them after a deliberate
/// change: `cargo test --release --test quant_digests -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_digests() {
    for (t, name) in [
        (QuantType::Q4S, "Q4_S"),
        (QuantType::Iq4Nl, "IQ4_NL"),
        (QuantType::Q4K, "Q4_K"),
    ] {
        println!("const {name}: &[&str] = &[");
        for d in all_digests(t) {
            println!("    \"{d}\",");
        }
        println!("];");
    }
}

const Q4_S: &[&str] = &[
    "36e388d1bc0f238eb98e98bb5a17fef92c6a25021ae10cea01f7d29de12efd85",
    "23fb1c9e7b3132ed687fae84cbbb72b2b1953a4caf666370aa7b598e36698120",
    "ac97dd43d9372fc5d24180de40810e5f6a741e9f8450a1f0998bbd12da3ac0d9",
    "e4bf8b9a8d8fcdb9c9914a15ec12c75278512a403950dba103c027bc6a406098",
    "5489ae37862fea6c1acf29c644d385cefb944bc91897f9d57b69fe3d024e8925",
    "8ff8aa4de16175a73c5fe9d8b0ecf130d7717d57bca556d35f070daa66ebae72",
    "0af14a7311f80b36bc4d00ce2ba1a86c981cd420519434ec06b29d394ca116f8",
    "1c40c15d06314915f726bd80fa88a7c949171389b29ea412eeee1f7199ba499c",
    "66deb298cf6456774ceab00f70e5f796ab408876e52d78f2769f45c7da115929",
    "da29d5f4740dca41bfbf0ccb14b06b5dc6619f6239d2124bb72f70ccb8d61480",
    "39f7abb78870039bf15212d37bc42b921a2f96da1a31a699d121d3d3e20d8841",
    "804521121221c8765e0da432f2852336c72727062d47db72b6f2bdf83c9d5cdb",
    "e0ee5923a631ce90e52a4e94171e4d2e404e91fbb0fe3129ff22d2e89d62a6a1",
    "3ccaf357790b7276c77b18893cd647a1bff420c4b7a6fcc4a1fa4df70840c519",
    "66b20af7411a534a3692dcea7002736065406ad0928f9ed878a34e131d580091",
    "9cac522eecf02ac559599cc26340cdff12b70632ce00deba37b9f6a4123fc3cc",
    "912b6d82dd1719a27e9ae818bc5260cc1bb3fcbb12a8abce992965b453ff1968",
    "79358c23ec8eb45c1dbc24ef393b5b6aad7c800b2cb7cb1c768eb1bb2d16c48d",
];
const IQ4_NL: &[&str] = &[
    "905e05c98659d98844b891cc41d4c67b305321570f4065e94d586238d3b2f3a7",
    "5802cd25ef25e572d460cef5199c92f2ae06a75f88459723f4b194261bcc4065",
    "56535af76e574f956bf19b2c7188a8b1a08050dcca55bcc8da6e048dc7065b72",
    "040f8fd57ed666301abfceeee6bff500388a487118d4820b941672cb3896de7f",
    "45ebf1581883380bc916c1da70d360b53d7b758f1ce9c602f991428eac5f2074",
    "16d63bbd301589eac2ca7786fec6f53ed1214b4b55ec68d74ec2ac42a887594a",
    "65415d333af6b6b247a0578592cde99b51d6cde123919d194601630455615d37",
    "2329e167d60c54e7577509203470dd3e73656c93a78a3039fc3ce6f0c65a368d",
    "8f5a69eb91d7d59efe77e9c7134bbb709580aab5459251cb7e7bc054428a4dca",
    "1c0273095382988333e2f2b5ae487cea460737ed9be65cbad9c5de537f95bf75",
    "e45b063149d3e138beecc81c190285c89dc8bf814c74bd5c4697b8d32a00a562",
    "fab373e29ec833ce8957734a44b32558bdcd42dd8ac6dfacd78afdaeb3af759f",
    "d8923f99c8f33521212f3a824cd8fe63d187c67dd207146f963fde63b5969bd3",
    "d3b252e5507e60f7f84537ebee28b38621e2462bf1e2d9e4889db1c831e9665a",
    "b735c6545c9e4902b9ad7bf787b07c5fd5f9e8454806ac679cf7b17e07559a6f",
    "221c8f72b458422dda2d0c418b3d4775e34fac32a772dcf07ce0462ca700f71d",
    "f48a94afe4c14f658648f4eaf9d463e64dd8cd7f52e7f34b4c1a019195ec6db0",
    "e46b66ca0e7165378a0d9f99b7e12764cb63a848f236edddeb58d3460c0d108c",
    "de14c1daf120f61712aa164e3a338ff4157699ce37b004f93d12395b8ca76791",
    "3d544c0c3b8c21951f1d1d7b62d7c7bb03aebf2208d1d00c7171604e1787716a",
];
const Q4_K: &[&str] = &[
    "62c25d6bdaf1176e6d0743ab45a177882b7c8c651a71c9f2102a4093eab59b55",
    "a143e1af3314ac4ffad3b85029e55aff525c8c580912af8df25bdd34679dec5e",
    "8502061515cce1cf82c2e96174c3372fc7873d92ec9432f4c90ba706577c0dfb",
    "184b36b76187ab0a3e90a804081fc9deb0e88edd49db9012e74829cdad0bc569",
    "2acd08e79fc66a5b17d1598d94b76cf317faf62d031a4ab23aa2aa4240cf154b",
    "a4ba8095b5467464a6e4d5d639f70fcfdb714ef3ea93ebaf515ea76dc65d7935",
    "14049ecedd8880673c6f36b6347a397707cd9a49e28029cc88c2213fff246f82",
    "963420d3e4e9cab9693b2e38f595e08b322d4ea845988d4952a8b37deebc1534",
    "1c6cec086a19681aaddb7ef7b1a3c865c19ac43231d4662a3f14d31ebeca0da8",
    "aeeb32e4f4d3806479ec28c3c704ddd9c4e9cb92b2aac8ece88a2978e7ab59a3",
    "653725c968e9c4cd3de4a73642de4c19c7e3885d7c07f56da3df2c95daa172f3",
    "ffa1d0094e8d817eb2d1e5b398c23fa42683dd471b0b1252cca5865761de52a8",
    "739c18c1a4ec79c92261d38f31ee91cdc1146ac2ffb0c7ab22677adc17e30e12",
    "ffbf950edbbc8902bbac423c4053ecec0c49080a54614b270963f6eb896c8e72",
    "62d316aa7022f2afe581066e84693c8d08e933f63a0fdfb1cd26d2d4dfc7c1eb",
    "95bbc81f8852a7fdcc2c80e6c176b910200e72ce6917e4ee5c9df6c1f8da123e",
    "165cf7cd92acd0a4cde21c18f0162b80d1c0884dc9cdaf2e4cfe3421e03fbb0d",
    "ef760027acc4a61c8f31991d9ed67537e2fb0e59be8fa16acc393a0c989ef276",
];
