# vdev.elf: virtio driver test guest, entered through the Linux 64-bit boot
# protocol (RSI = boot_params). CPL0 here is interpreted by this host's KVM,
# so CPL0 only sets up (kinit in C: page tables, GDT, TSS, IDT) and then
# drops to CPL3 with IOPL 3, where the drivers run natively. Interrupts from
# CPL3 enter the CPL0 handlers below through the TSS's RSP0.
        .section .head, "ax"
        .code64
        hlt                             # 32-bit entry: not supported
        .org    0x200, 0xf4
        .globl  startup_64
startup_64:
        lea     kstack_top(%rip), %rsp
        mov     %rsi, %rdi
        call    kinit                   # returns the user entry argument in rax
        lgdt    gdt_desc(%rip)
        lea     1f(%rip), %rax
        push    $0x08
        push    %rax
        lretq
1:      mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x28, %ax
        ltr     %ax
        lidt    idt_desc(%rip)
        push    $0x1b                   # user SS
        lea     ustack_top(%rip), %rax
        push    %rax
        push    $0x3202                 # RFLAGS: IOPL 3, IF 1 (sti faults at CPL3 here)
        push    $0x23                   # user CS (64-bit)
        lea     umain_entry(%rip), %rax
        push    %rax
        iretq

umain_entry:
        mov     $0x1b, %ax
        mov     %ax, %ds
        mov     %ax, %es
        call    umain
1:      jmp     1b

# MSI-X vectors 0x40..0x47: count per vector, EOI to the local APIC.
        .macro  msix n
        .globl  irq_\n
irq_\n:
        push    %rax
        lea     irq_count(%rip), %rax
        lock incl \n*4(%rax)
        mov     $0xfee000b0, %rax
        movl    $0, (%rax)
        pop     %rax
        iretq
        .endm
        msix 0
        msix 1
        msix 2
        msix 3
        msix 4
        msix 5
        msix 6
        msix 7

# INTx (IOAPIC) vector 0x50: count, read the device's ISR, EOI.
        .globl  irq_intx
irq_intx:
        push    %rax
        lea     intx_count(%rip), %rax
        lock incl (%rax)
        mov     intx_isr(%rip), %rax    # level-triggered: reading the ISR
        test    %rax, %rax              # drops the line before the EOI
        jz      1f
        movb    (%rax), %al
1:      mov     $0xfee000b0, %rax
        movl    $0, (%rax)
        pop     %rax
        iretq

# Any exception: report the vector number found at exc_vec and halt.
        .globl  exc_common
exc_common:
        mov     %rsp, %rdi
        call    exc_report
        cli
1:      hlt
        jmp     1b

        .data
        .align  16
        .globl  gdt
gdt:    .quad   0
        .quad   0x00af9b000000ffff      # 0x08 kernel code 64
        .quad   0x00cf93000000ffff      # 0x10 kernel data
        .quad   0x00cff3000000ffff      # 0x18 user data
        .quad   0x00affb000000ffff      # 0x20 user code 64
        .quad   0, 0                    # 0x28 TSS (filled by kinit)
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .globl  idt_desc
idt_desc:
        .word   256 * 16 - 1
        .quad   idt

        .bss
        .align  4096
        .globl  idt
idt:    .skip   4096
        .globl  irq_count
irq_count: .skip 32
        .globl  intx_count
intx_count: .skip 4
        .align  16
kstack: .skip   16384
        .globl  kstack_top
kstack_top:
ustack: .skip   65536
ustack_top:
