# multi.rom: a bootrom that enters 32-bit protected mode, says "ready", then
# obeys one-letter commands read from COM1:
#   p  power off (PM1a 0x404)        r  reset via 0xcf9      k  reset via i8042
#   h  cli; hlt (halt)               t  triple fault (#UD with an empty IDT)
#   e  echo input until '.'          c  walk PCI bus 0 and print what answers
#   l  endless port-I/O loop at CPL3 L  10000 port writes at CPL3, then power off
#   i  echo input through IRQ 4 until '.' (interrupt driven, halts with IF=1)
#   w  wait for the ACPI power button (polls PM1 status), then power off
#   x  hostile accesses, then "survived" and power off
#   b  write the boot-timer port      z  idle forever (sti; hlt, PIC masked)
#   n  int3 at CPL0 (an instruction this host's KVM cannot emulate)
#   y  print 'y' forever                s  start the APs with INIT/SIPI, wait for one to check in, then halt
        .equ ROM, 0xffff0000
        .equ COM1, 0x3f8
        .equ IDT, 0x1000
        .equ RAMBUF, 0x3000

        .code16
        .text
start16:
        cli
        lgdtl   %cs:(gdt_desc - start16)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $start32

        # In .text so real-mode code can address it relative to start16.
        .align  8
gdt:    .quad   0
        .quad   0x00cf9b000000ffff      # 0x08 code, ring 0 (accessed: the ROM is read-only)
        .quad   0x00cf93000000ffff      # 0x10 data, ring 0
        .quad   0x00cffb000000ffff      # 0x18 code, ring 3
        .quad   0x00cff3000000ffff      # 0x20 data, ring 3
        .quad   0x00af9b000000ffff      # 0x28 code, 64-bit, ring 0
        .quad   0x00affb000000ffff      # 0x30 code, 64-bit, ring 3
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .code32
start32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $0x7000, %esp
        mov     $ready, %esi
        call    puts
cmdloop:
        call    getc
        cmp     $'p', %al
        je      poweroff
        cmp     $'r', %al
        je      reset_cf9
        cmp     $'k', %al
        je      reset_kbd
        cmp     $'h', %al
        je      halt
        cmp     $'t', %al
        je      triple
        cmp     $'e', %al
        je      echo
        cmp     $'c', %al
        je      pciscan
        cmp     $'l', %al
        je      userloop
        cmp     $'L', %al
        je      userloop_n
        cmp     $'i', %al
        je      irqecho
        cmp     $'w', %al
        je      pwrbtn
        cmp     $'x', %al
        je      hostile
        cmp     $'b', %al
        je      boottimer
        cmp     $'z', %al
        je      idle
        cmp     $'n', %al
        je      badinsn
        cmp     $'s', %al
        je      smp
        cmp     $'y', %al
        je      yes
        jmp     cmdloop

poweroff:
        mov     $0x404, %dx
        mov     $0x3400, %ax
        out     %ax, %dx
1:      hlt
        jmp     1b

reset_cf9:
        mov     $0xcf9, %dx
        mov     $0x6, %al
        out     %al, %dx
        jmp     .

reset_kbd:
        mov     $0xfe, %al
        out     %al, $0x64
        jmp     .

halt:
        cli
        hlt
        jmp     halt

triple:
        lidt    idt_empty
        ud2

# SMP: copy a real-mode trampoline to 0x8000, INIT + SIPI (vector 8) to all
# other CPUs through the xAPIC ICR, wait for the flag an AP sets, then halt
# (every vCPU ends in HLT with IF=0).
smp:
        mov     $ap_start, %esi
        mov     $0x8000, %edi
        mov     $(ap_end - ap_start), %ecx
        cld
        rep movsb
        movl    $0, 0x7f00
        movl    $0x1ff, 0xfee000f0      # SVR: APIC software enabled
        movl    $0x000c4500, 0xfee00300 # INIT, all excluding self
        mov     $1000, %ecx
1:      loop    1b
        movl    $0x000c4608, 0xfee00300 # SIPI, vector 8 (0x8000)
2:      cmpl    $0, 0x7f00
        je      2b
        mov     $ap_ok, %esi
        call    puts
        jmp     halt

        .code16
ap_start:
        lock incl 0x7f00
        cli
1:      hlt
        jmp     1b
ap_end:
        .code32

yes:
        mov     $'y', %al
        call    putc
        jmp     yes

badinsn:
        int3                            # not emulated at CPL0 here: error exit
        jmp     poweroff

idle:
        mov     $0xff, %al
        out     %al, $0x21
        out     %al, $0xa1
1:      sti
        hlt
        jmp     1b

boottimer:
        mov     $0x440, %dx
        out     %al, %dx
        jmp     cmdloop

echo:
        call    getc
        cmp     $'.', %al
        je      1f
        call    putc
        jmp     echo
1:      mov     $bye, %esi
        call    puts
        jmp     poweroff

# PCI: for each device of bus 0, function 0, print id and class dwords.
pciscan:
        xor     %ebx, %ebx
1:      mov     %ebx, %eax
        shl     $11, %eax
        or      $0x80000000, %eax
        mov     $0xcf8, %dx
        out     %eax, %dx
        mov     $0xcfc, %dx
        in      %dx, %eax
        cmp     $0xffffffff, %eax
        je      2f
        mov     %eax, %edi
        mov     $pci_s, %esi
        call    puts
        mov     %ebx, %eax
        call    puthex8
        mov     $pci_id, %esi
        call    puts
        mov     %edi, %eax
        call    puthex32
        mov     %ebx, %eax
        shl     $11, %eax
        or      $0x80000008, %eax
        mov     $0xcf8, %dx
        out     %eax, %dx
        mov     $0xcfc, %dx
        in      %dx, %eax
        mov     %eax, %edi
        mov     $pci_class, %esi
        call    puts
        mov     %edi, %eax
        call    puthex32
        mov     $'\n', %al
        call    putc
2:      inc     %ebx
        cmp     $32, %ebx
        jne     1b
        mov     $pci_done, %esi
        call    puts
        jmp     cmdloop

# Drop to CPL3 with IOPL 3 and loop on port writes. User mode runs natively
# on this host's KVM only in long mode (CPL0 and 32-bit iret to CPL3 are
# interpreted or missing), so: identity page tables (user accessible),
# EFER.LME, paging on, then iretq to 64-bit user code.
        .equ PML4, 0x10000
userloop:
        mov     $user_forever, %ebx
        jmp     to_user
userloop_n:
        mov     $user_counted, %ebx
to_user:
        mov     $PML4, %edi             # zero PML4, PDPT and two PDs
        xor     %eax, %eax
        mov     $(4 * 1024), %ecx
        cld
        rep stosl
        movl    $(PML4 + 0x1000 + 7), PML4
        movl    $(PML4 + 0x2000 + 7), PML4 + 0x1000         # 0..1 GiB
        movl    $(PML4 + 0x3000 + 7), PML4 + 0x1000 + 3 * 8 # 3..4 GiB
        mov     $(PML4 + 0x2000), %edi
        mov     $0x87, %eax             # present, writable, user, 2 MiB
        mov     $512, %ecx
1:      mov     %eax, (%edi)
        mov     %eax, 0x1000(%edi)
        addl    $0xc0000000, 0x1000(%edi)
        add     $0x200000, %eax
        add     $8, %edi
        loop    1b
        mov     %cr4, %eax
        or      $0x20, %eax             # PAE
        mov     %eax, %cr4
        mov     $PML4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       # EFER.LME
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax
        mov     %eax, %cr0
        ljmp    $0x28, $long64
        .code64
long64:
        push    $0x23                   # user data
        push    $0x6ff0
        push    $0x3002                 # IOPL 3, IF 0
        push    $0x33                   # 64-bit user code
        push    %rbx
        iretq
user_forever:
1:      out     %al, $0x80
        jmp     1b
user_counted:
        mov     $10000, %ecx
1:      out     %al, $0x80
        dec     %ecx
        jnz     1b
        mov     $0x404, %dx
        mov     $0x3400, %ax
        out     %ax, %dx
        jmp     .
        .code32

# Interrupt-driven echo: PIC remapped to 0x20, only IRQ 4 unmasked, UART
# RX interrupt on (IER=1, OUT2), handler prints "[c]" per byte.
irqecho:
        mov     $IDT, %edi
        mov     $0x30, %ecx             # vectors 0..0x2f
        mov     $spurious, %ebx
1:      call    setgate
        add     $8, %edi
        loop    1b
        mov     $(IDT + 0x24 * 8), %edi
        mov     $com1_isr, %ebx
        call    setgate
        lidt    idt_desc
        mov     $0x11, %al              # ICW1
        out     %al, $0x20
        out     %al, $0xa0
        mov     $0x20, %al              # ICW2: vector bases
        out     %al, $0x21
        mov     $0x28, %al
        out     %al, $0xa1
        mov     $4, %al                 # ICW3
        out     %al, $0x21
        mov     $2, %al
        out     %al, $0xa1
        mov     $1, %al                 # ICW4: 8086 mode
        out     %al, $0x21
        out     %al, $0xa1
        mov     $0xef, %al              # unmask IRQ 4 only
        out     %al, $0x21
        mov     $0xff, %al
        out     %al, $0xa1
        mov     $(COM1 + 4), %dx        # MCR: OUT2 | RTS | DTR
        mov     $0x0b, %al
        out     %al, %dx
        mov     $(COM1 + 1), %dx        # IER: RX data
        mov     $1, %al
        out     %al, %dx
        mov     $irq_ready, %esi
        call    puts
2:      sti
        hlt
        jmp     2b

# edi = gate address, ebx = handler: 32-bit interrupt gate, selector 0x08.
setgate:
        mov     %ebx, %eax
        mov     %ax, (%edi)
        movw    $0x08, 2(%edi)
        movw    $0x8e00, 4(%edi)
        shr     $16, %eax
        mov     %ax, 6(%edi)
        ret

spurious:
        push    %eax
        mov     $0x20, %al
        out     %al, $0xa0
        out     %al, $0x20
        pop     %eax
        iret

com1_isr:
        push    %eax
        push    %edx
1:      mov     $(COM1 + 5), %dx
        in      %dx, %al
        test    $1, %al
        jz      2f
        mov     $COM1, %dx
        in      %dx, %al
        push    %eax
        mov     $'[', %al
        call    putc
        pop     %eax
        push    %eax
        call    putc
        mov     $']', %al
        call    putc
        pop     %eax
        cmp     $'.', %al
        jne     1b
        mov     $'\n', %al
        call    putc
        jmp     poweroff
2:      mov     $0x20, %al
        out     %al, $0x20
        pop     %edx
        pop     %eax
        iret

# ACPI power button: enable PWRBTN_EN and poll PWRBTN_STS.
pwrbtn:
        mov     $0x402, %dx
        mov     $0x100, %ax
        out     %ax, %dx
        mov     $pwr_wait, %esi
        call    puts
        mov     $0x400, %dx
1:      in      %dx, %ax
        test    $0x100, %ax
        jz      1b
        mov     $0x100, %ax             # acknowledge (write 1 to clear)
        out     %ax, %dx
        mov     $pwr_pressed, %esi
        call    puts
        jmp     poweroff

# Accesses a hostile guest might make; the VMM must shrug them off.
hostile:
        mov     $0x3fc, %dx             # dword over MCR/LSR/MSR/SCR
        xor     %eax, %eax
        out     %eax, %dx
        mov     $0x3fe, %dx             # dword read past the UART's end
        in      %dx, %eax
        mov     $0x3ff, %dx
        in      %dx, %ax
        mov     $0xcf8, %dx             # PCI: offset 0xfc, reads straddling the end
        mov     $0x800000fc, %eax
        out     %eax, %dx
        mov     $0xcfe, %dx
        in      %dx, %eax
        mov     $0xcff, %dx
        out     %ax, %dx
        mov     $0xcf8, %dx             # a byte to the address latch
        mov     $0xff, %al
        out     %al, %dx
        mov     $0xcf9, %dx             # dword to the reset port: no reset
        mov     $0xffffffff, %eax
        out     %eax, %dx
        mov     $0xcf8, %dx             # bus 255, device 31, function 7
        mov     $0x80fffffc, %eax
        out     %eax, %dx
        mov     $0xcfc, %dx
        in      %dx, %eax
        out     %eax, %dx
        mov     $0x1234, %dx            # unknown ports
        in      %dx, %al
        mov     $0x5678, %dx
        out     %ax, %dx
        in      %dx, %eax
        mov     $0x408, %dx             # PM timer
        in      %dx, %eax
        mov     $0x406, %dx             # between PM1a control and the timer
        out     %eax, %dx
        in      %dx, %eax
        mov     $0x80, %dx              # string output, count > 1
        mov     $hostile_data, %esi
        mov     $100, %ecx
        cld
        rep outsb
        mov     $COM1 + 7, %dx          # string input from the scratch register
        mov     $RAMBUF, %edi
        mov     $64, %ecx
        rep insb
        movl    $0x12345678, 0xd0000000 # MMIO: nothing there
        mov     0xd0000000, %eax
        mov     0xe0000000, %eax
        mov     0xfee01000, %eax
        mov     $0xffff8000, %edi       # write to the read-only bootrom
        mov     (%edi), %ebx
        movl    $0xdeadbeef, (%edi)
        cmp     (%edi), %ebx
        jne     1f
        mov     $survived, %esi
        call    puts
        jmp     poweroff
1:      mov     $rom_written, %esi
        call    puts
        jmp     poweroff

# --- serial helpers (polled) ---
getc:
        push    %edx
        mov     $(COM1 + 5), %dx
1:      in      %dx, %al
        test    $1, %al
        jz      1b
        mov     $COM1, %dx
        in      %dx, %al
        pop     %edx
        ret

putc:
        push    %edx
        push    %eax
        mov     $(COM1 + 5), %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        pop     %eax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %edx
        ret

puts:
        push    %eax
1:      mov     (%esi), %al
        test    %al, %al
        jz      2f
        call    putc
        inc     %esi
        jmp     1b
2:      pop     %eax
        ret

puthex4:
        and     $0xf, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     1f
        add     $('a' - '9' - 1), %al
1:      jmp     putc

puthex8:
        push    %eax
        shr     $4, %al
        call    puthex4
        pop     %eax
        push    %eax
        call    puthex4
        pop     %eax
        ret

puthex32:
        push    %ecx
        mov     $8, %ecx
1:      rol     $4, %eax
        push    %eax
        call    puthex4
        pop     %eax
        loop    1b
        pop     %ecx
        ret

        .section .rodata
idt_empty:
        .word   0
        .long   0
idt_desc:
        .word   0x30 * 8 - 1
        .long   IDT
ready:  .asciz  "ready\n"
bye:    .asciz  "\nbye\n"
pci_s:  .asciz  "pci 0:"
pci_id: .asciz  ".0 id "
pci_class: .asciz " class "
pci_done: .asciz "pci done\n"
irq_ready: .asciz "irq ready\n"
pwr_wait: .asciz "waiting for power button\n"
pwr_pressed: .asciz "power button pressed\n"
survived: .asciz "survived\n"
ap_ok:  .asciz  "ap started\n"
rom_written: .asciz "bootrom was written\n"
hostile_data: .fill 100, 1, 0x55

        .section .reset, "ax"
        .globl  reset
        .code16
reset:  jmp     start16
        .org    16, 0xf4
