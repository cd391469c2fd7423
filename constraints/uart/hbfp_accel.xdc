# hbfp_accel: the hbfp-hw UART accelerator, design clock 50 MHz, UART 3000000 baud
create_clock -name clk -period 20.000 [get_ports {clk}]
# asynchronous inputs (the UART receiver synchronises rx)
set_false_path -from [get_ports {rx rst}]
# asynchronous outputs (UART transmitter, status LEDs)
set_false_path -to [get_ports {tx busy}]
# pins: fill in your board's, e.g.
# set_property -dict {PACKAGE_PIN <pin> IOSTANDARD LVCMOS33} [get_ports clk]
# set_property -dict {PACKAGE_PIN <pin> IOSTANDARD LVCMOS33} [get_ports rst]
# set_property -dict {PACKAGE_PIN <pin> IOSTANDARD LVCMOS33} [get_ports rx]
# set_property -dict {PACKAGE_PIN <pin> IOSTANDARD LVCMOS33} [get_ports tx]
# set_property -dict {PACKAGE_PIN <pin> IOSTANDARD LVCMOS33} [get_ports busy]
