"""The launchers' host arithmetic (kernels.host) against Triton's own functions it stands in for."""

import triton

from kernels.host import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for n in [*range(1, 2100), 4095, 4096, 4097, 50257, 1 << 20, (1 << 20) + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 128, 50257):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 7) == 0
