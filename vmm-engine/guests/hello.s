# hello.rom: real-mode bootrom. Prints a line on COM1, then powers off
# through the ACPI PM1a control register (SLP_TYP=5 | SLP_EN).
        .equ ROM, 0xffff0000
        .equ COM1, 0x3f8
        .code16
        .text
start:
        cli
        mov     $(msg - start), %si
1:      mov     %cs:(%si), %bl
        test    %bl, %bl
        jz      3f
        mov     $(COM1 + 5), %dx        # LSR: wait for THR empty
2:      in      %dx, %al
        test    $0x20, %al
        jz      2b
        mov     $COM1, %dx
        mov     %bl, %al
        out     %al, %dx
        inc     %si
        jmp     1b
3:      mov     $0x404, %dx
        mov     $0x3400, %ax
        out     %ax, %dx
4:      hlt
        jmp     4b
msg:    .asciz  "hello from bootrom\n"

        .section .reset, "ax"
        .globl  reset
reset:  jmp     start
        .org    16, 0xf4
