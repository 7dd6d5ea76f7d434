# Entry through the Linux 64-bit boot protocol: RSI = boot_params.
        .section .head, "ax"
        .code64
        hlt                             # 32-bit entry: not supported
        .org    0x200, 0xf4
        .globl  startup_64
startup_64:
        mov     %rsi, %rdi
        lea     stack_top(%rip), %rsp
        call    kmain
1:      hlt
        jmp     1b

        .bss
        .align  16
stack:  .skip   16384
stack_top:
