"""S4's and DSS's fast kernels against the definition K̄_k = C Ā^k B̄ (dense powers), and the recurrent form of
each SSM against its convolutional form."""

import pytest
import torch

from effref.alternatives.s4 import (c_tilde, discretize_bilinear, discretize_zoh, dss_kernel, hippo_dplr, hippo_legs,
                                    kernel_by_powers, s4_kernel, ssm_convolve, ssm_recurrent)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_complex(n: int, g: torch.Generator) -> torch.Tensor:
    real, imag = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    return torch.complex(real, imag)


def stable_eigenvalues(n: int, g: torch.Generator) -> torch.Tensor:
    """λ with negative real parts (a decaying state) and arbitrary frequencies."""
    return torch.complex(-torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))


def test_hippo_legs_by_its_formula():
    A = hippo_legs(4)
    for n in range(4):
        for k in range(4):
            expected = -((2 * n + 1) * (2 * k + 1)) ** 0.5 if n > k else -(n + 1) if n == k else 0.0
            assert A[n, k].item() == pytest.approx(expected)


@pytest.mark.parametrize("N", [4, 16, 64])
def test_hippo_dplr_rebuilds_hippo(N):
    Lambda, p, b, V = hippo_dplr(N)
    torch.testing.assert_close(V.conj().T @ V, torch.eye(N, dtype=V.dtype), rtol=0, atol=1e-10)  # unitary
    rebuilt = V @ (torch.diag(Lambda) - torch.outer(p, p.conj())) @ V.conj().T
    torch.testing.assert_close(rebuilt, hippo_legs(N).to(rebuilt.dtype), rtol=0, atol=1e-9 * N)
    torch.testing.assert_close(V @ b, torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1).to(b.dtype))
    assert torch.allclose(Lambda.real, torch.full((N,), -0.5, dtype=torch.float64))  # stable: Re λ < 0


@pytest.mark.parametrize("init", ["hippo", "random"])
@pytest.mark.parametrize("L", [1, 16, 100])
def test_s4_kernel_equals_powers_of_the_discretised_matrix(init, L):
    g = torch.Generator().manual_seed(L)
    N, step = 16, 0.05
    if init == "hippo":
        Lambda, P, B, _ = hippo_dplr(N)
        Q = P
    else:
        Lambda = stable_eigenvalues(N, g)
        P, Q, B = random_complex(N, g) * 0.3, random_complex(N, g) * 0.3, random_complex(N, g)
    C = random_complex(N, g)
    Ab, Bb = discretize_bilinear(torch.diag(Lambda) - torch.outer(P, Q.conj()), B, step)
    expected = kernel_by_powers(Ab, Bb, C, L)
    torch.testing.assert_close(s4_kernel(Lambda, P, Q, B, c_tilde(Lambda, P, Q, C, step, L), step, L), expected,
                               rtol=1e-9, atol=1e-9)


def test_dss_kernel_equals_powers_of_the_zoh_matrix():
    g = torch.Generator().manual_seed(0)
    N, L, step = 12, 64, 0.1
    Lambda = stable_eigenvalues(N, g)
    B, C = random_complex(N, g), random_complex(N, g)
    a, Bb = discretize_zoh(Lambda, B, step)
    # the zero-order hold by its definition: Ā = exp(ΔA) as a matrix exponential, B̄ = A⁻¹(Ā − I) B
    A = torch.diag(Lambda)
    Ab = torch.linalg.matrix_exp(step * A)
    torch.testing.assert_close(torch.diagonal(Ab), a)
    torch.testing.assert_close(torch.linalg.solve(A, (Ab - torch.eye(N, dtype=A.dtype)) @ B), Bb)
    torch.testing.assert_close(dss_kernel(Lambda, B, C, step, L), kernel_by_powers(Ab, Bb, C, L), rtol=1e-10,
                               atol=1e-10)


def test_recurrent_and_convolutional_forms_agree():
    g = torch.Generator().manual_seed(1)
    N, L, step = 8, 50, 0.1
    u = torch.randn(3, L, generator=g, dtype=torch.float64)
    Lambda, P, B, _ = hippo_dplr(N)  # S4: dense Ā
    C = random_complex(N, g)
    Ab, Bb = discretize_bilinear(torch.diag(Lambda) - torch.outer(P, P.conj()), B, step)
    K = s4_kernel(Lambda, P, P, B, c_tilde(Lambda, P, P, C, step, L), step, L)
    torch.testing.assert_close(ssm_recurrent(Ab, Bb, C, u), ssm_convolve(K, u), rtol=1e-9, atol=1e-9)
    a, Bb = discretize_zoh(Lambda, B, step)  # DSS: diagonal Ā, the recurrence as a scan
    K = dss_kernel(Lambda, B, C, step, L)
    torch.testing.assert_close(ssm_recurrent(a, Bb, C, u), ssm_convolve(K, u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda: discretize_zoh(torch.ones(2), torch.ones(2), 0.0), r"step=0.0 must be positive"),
    (lambda: dss_kernel(torch.ones(2), torch.ones(2), torch.ones(2), 0.1, 0), r"L=0 must be a positive integer"),
    (lambda: s4_kernel(*(torch.ones(2, dtype=torch.complex128),) * 4, torch.ones(3, dtype=torch.complex128), 0.1, 8),
     r"Lambda, P, Q, B, Ct must all have one shape \(N,\)"),
    (lambda: hippo_legs(0), r"N=0 must be a positive integer"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()
