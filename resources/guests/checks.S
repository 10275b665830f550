/*
 * checks.S -- the stamp guest's optional checks (included by stamp.S, in its
 * .text, 64-bit code; uses stamp.S's constants, variables and helpers).
 *
 *   timer=1       IDT, LAPIC timer in TSC-deadline mode re-armed by its
 *                 interrupt handler, "stamp: ticks <n>" reports.
 *   zero-check=1  sweeps over the RAM pages the guest never writes.
 *
 * See README.md next to this file.
 */

/* ------------------------------------------------------------------------ */
/* timer=1: IDT, LAPIC timer in TSC-deadline mode, tick reports              */
/* ------------------------------------------------------------------------ */

/* idle_loop: region=0 with timer=1: sleep until the next interrupt, report. */
idle_loop:
        hlt
        call    tick_report
        jmp     idle_loop

/* timer_setup: idt_setup, then puts the LAPIC timer in TSC-deadline mode,
 * arms the first deadline and sets IF.
 * Clobbers rax, rcx, rdx, rdi. */
timer_setup:
        call    idt_setup
        mov     rdi, [lapic_base]
        mov     dword ptr [rdi + APIC_LVT_TIMER], TIMER_VEC | LVT_TSC_DEADLINE
        call    arm_timer
        sti
        ret

/* idt_setup: fills the IDT (every vector -> unexpected_isr but the timer
 * and spurious vectors), loads it and software-enables the xAPIC (SVR,
 * TPR = 0; the LVT entries stay as they are: masked after reset).  Used by
 * timer=1 and dev=1 (dev.S then installs its vectors 0x41..0x48).
 * Clobbers rax, rcx, rdx, rdi. */
idt_setup:
        lea     rdi, [idt]
        xor     ecx, ecx
1:      lea     rax, [unexpected_isr]
        cmp     ecx, TIMER_VEC
        jne     2f
        lea     rax, [timer_isr]
2:      cmp     ecx, SPURIOUS_VEC
        jne     3f
        lea     rax, [spurious_isr]
3:      mov     [rdi], ax                       /* offset 15:0 */
        mov     word ptr [rdi + 2], SEL_CODE64
        mov     word ptr [rdi + 4], 0x8e00      /* present, DPL 0, interrupt gate */
        shr     rax, 16
        mov     [rdi + 6], ax                   /* offset 31:16 */
        shr     rax, 16
        mov     [rdi + 8], eax                  /* offset 63:32 */
        mov     dword ptr [rdi + 12], 0
        add     rdi, 16
        inc     ecx
        cmp     ecx, IDT_ENTRIES
        jne     1b
        lidt    [idt_desc]

        mov     ecx, MSR_APIC_BASE
        rdmsr
        or      eax, APIC_BASE_EN
        wrmsr
        and     eax, 0xfffff000                 /* zero-extends: base < 4 GiB */
        mov     [lapic_base], rax
        mov     rdi, rax
        mov     dword ptr [rdi + APIC_TPR], 0
        mov     dword ptr [rdi + APIC_SVR], 0x100 | SPURIOUS_VEC
        ret

/* arm_timer: IA32_TSC_DEADLINE = TSC + TICK_TSC.  Clobbers rax, rcx, rdx. */
arm_timer:
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        add     rax, TICK_TSC
        mov     rdx, rax
        shr     rdx, 32
        mov     ecx, MSR_TSC_DEADLINE
        wrmsr
        ret

/* The timer interrupt: count, re-arm, EOI.  Preserves everything. */
timer_isr:
        push    rax
        push    rcx
        push    rdx
        inc     qword ptr [ticks]
        call    arm_timer
        mov     rax, [lapic_base]
        mov     dword ptr [rax + APIC_EOI], 0
        pop     rdx
        pop     rcx
        pop     rax
        iretq

/* Spurious LAPIC interrupt: no EOI. */
spurious_isr:
        iretq

/* Any other vector (an exception, or a stray interrupt): report and stop. */
unexpected_isr:
        lea     rsi, [str_err_vector]
        call    puts
        jmp     halt_forever

/* tick_report: once `ticks` reached `next_report`, prints
 * "stamp: ticks <n>" (n = the count read) and moves `next_report` to the
 * next multiple of TICKS_PER_LINE.  Clobbers rax, rcx, rdx, rdi, rsi, r11. */
tick_report:
        mov     r11, [ticks]
        cmp     r11, [next_report]
        jb      1f
        mov     rax, r11
        xor     edx, edx
        mov     ecx, TICKS_PER_LINE
        div     rcx
        inc     rax
        imul    rax, rax, TICKS_PER_LINE
        mov     [next_report], rax
        lea     rsi, [str_ticks]
        call    puts
        mov     rax, r11
        call    print_dec
        call    newline
1:      ret

/* ------------------------------------------------------------------------ */
/* zero-check=1: pages the guest never writes must read zero                 */
/* ------------------------------------------------------------------------ */

/* zero_sweep: for every RAM entry of the memmap (clipped to the identity
 * map), checks the parts outside the image and the stamp region:
 * [__image_end, REGION_BASE) and [region end + DMA areas (dev=1), ...).  Prints
 * "stamp: zero-check <n> ok" after a clean sweep; a NONZERO page is
 * reported by zero_range, which halts.
 * Clobbers rax, rcx, rdx, rsi, rdi, r8, r10, r11. */
zero_sweep:
        push    rbx
        push    rbp
        mov     ebx, [start_info_ptr]
        mov     r8, [rbx + SI_MEMMAP]           /* r8 = entry */
        mov     ebp, [rbx + SI_MEMMAP_N]        /* rbp = entries left */
1:      cmp     dword ptr [r8 + MM_TYPE], E820_RAM
        jne     4f
        mov     rsi, [r8 + MM_ADDR]
        mov     rbx, [r8 + MM_SIZE]
        add     rbx, rsi                        /* rbx = entry end */
        add     rsi, 4095
        and     rsi, -4096                      /* rsi = first whole page */
        and     rbx, -4096
        mov     rax, MAX_PDS << 30
        cmp     rbx, rax
        jbe     2f
        mov     rbx, rax
2:      /* part 1: [max(rsi, image end), min(rbx, REGION_BASE)) */
        mov     edi, offset __image_end
        add     rdi, 4095
        and     rdi, -4096
        cmp     rdi, rsi
        jae     3f
        mov     rdi, rsi
3:      mov     r11d, REGION_BASE
        cmp     r11, rbx
        jbe     31f
        mov     r11, rbx
31:     call    zero_range
        /* part 2: [max(rsi, region end + DMA areas), rbx) */
        mov     rdi, [region_mib]
        shl     rdi, 20
        add     rdi, REGION_BASE
        add     rdi, [dma_total]                /* 0 unless dev=1 */
        cmp     rdi, rsi
        jae     32f
        mov     rdi, rsi
32:     mov     r11, rbx
        call    zero_range
4:      add     r8, MM_ENTRY_SIZE
        dec     ebp
        jnz     1b
        inc     qword ptr [zero_sweeps]
        lea     rsi, [str_zero_ok1]
        call    puts
        mov     rax, [zero_sweeps]
        call    print_dec
        lea     rsi, [str_ok]
        call    puts
        pop     rbp
        pop     rbx
        ret

/* zero_range: pages [rdi, r11) (page-aligned; empty if rdi >= r11) must
 * read zero at the sampled offsets; else prints NONZERO and halts.
 * Clobbers rax, rdi. */
zero_range:
1:      cmp     rdi, r11
        jae     2f
        mov     rax, [rdi]
        or      rax, [rdi + ZC_OFF1]
        or      rax, [rdi + ZC_OFF2]
        or      rax, [rdi + ZC_OFF3]
        or      rax, [rdi + ZC_OFF4]
        jnz     3f
        add     rdi, 4096
        jmp     1b
2:      ret
3:      mov     rbx, rdi
        mov     rbp, rax
        lea     rsi, [str_nonzero]
        call    puts
        mov     rax, rbx
        shr     rax, 12
        call    print_dec
        lea     rsi, [str_found]
        call    puts
        mov     rax, rbp
        call    print_hex
        call    newline
        jmp     halt_forever
